"""Who signed what, and whether we accept it.

    keys.py      the ed25519 identity (the signer trust names, the libp2p peer id, the index key) and
                 the P-256 key it vouches for, which signs model.sig bundles
    dsse.py      DSSE envelopes in exactly one byte encoding (`canonical_json`); bare ed25519
                 envelopes are how model.sig was signed before bundles, and still verify
    bundle.py    model.sig as a Sigstore bundle v0.3 signed by the identity's P-256 key, as OpenSSF's
                 `model_signing verify key` reads it (`sign_bundle`, `open_signature`, `KeyBinding`)
    manifest.py  the signed adapter manifest: an OpenSSF model_signing in-toto statement over every
                 file's digest (`sign_directory`, `verify_directory`, `AdapterMeta`)
    trust.py     whose signatures we accept and which versions we have seen (`TrustPolicy`)

Main path: `Identity.load_or_create()` → `sign_directory(dir, identity, meta)` writes `model.sig`;
a puller runs `verify_directory(dir)` and `TrustPolicy.check(...)` decides whether we accept the signer
and version.
"""
