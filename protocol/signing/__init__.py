"""Who signed what, and whether we accept it.

    keys.py      the ed25519 identity: signs manifests, is the libp2p peer id and the index key
    dsse.py      DSSE envelopes in exactly one byte encoding (`canonical_json`, `sign_envelope`)
    manifest.py  the signed adapter manifest: an OpenSSF model_signing in-toto statement over every
                 file's digest (`sign_directory`, `verify_directory`, `AdapterMeta`)
    trust.py     whose signatures we accept and which versions we have seen (`TrustPolicy`)

Main path: `Identity.load_or_create()` → `sign_directory(dir, identity, meta)` writes `model.sig`;
a puller runs `verify_directory(dir)` and `TrustPolicy.check(...)` decides whether we accept the signer and version.
"""
