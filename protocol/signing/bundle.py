"""model.sig as a Sigstore bundle v0.3, the form OpenSSF's `model_signing verify key` reads.

    >>> bundle = sign_bundle(canonical_json(statement), identity)  # statement holds KeyBinding.of(identity)
    >>> payload, signer, _ = open_signature(envelope_bytes(bundle))  # signer: ed25519 hex; else VerifyError

What `model_signing` 1.x writes for a key-based signature, in our one canonical JSON encoding:

    {"dsseEnvelope": {"payload": b64(statement), "payloadType": "application/vnd.in-toto+json",
                      "signatures": [{"keyid": "", "sig": b64(ECDSA-P256-SHA256 DER over PAE)}]},
     "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
     "verificationMaterial": {"publicKey": {"hint": sha256 hex of the P-256 public key PEM},
                              "tlogEntries": []}}

The P-256 key is named by the statement itself, in `predicate.commons.signer` (`model_signing` reads only
`serialization` and `resources` from the predicate and ignores the rest):

    {"ed25519": identity hex, "p256": b64(SubjectPublicKeyInfo DER), "sig": b64(ed25519 signature over
     b"commons-p256-key:v1:" + that DER)}

so opening a bundle checks two signatures: the identity vouches for the P-256 key, the P-256 key signed
the statement. The signer we report, pin and index is the ed25519 key. A model.sig written before bundles
(a bare DSSE envelope signed by ed25519, `dsse.open_envelope`) still opens here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from protocol.errors import VerifyError
from protocol.signing.dsse import (
    MAX_ENVELOPE_BYTES,
    PAYLOAD_TYPE,
    b64_field,
    exact_keys,
    open_envelope,
    pae,
    parse_canonical,
)
from protocol.signing.keys import Identity, p256_public_key, pem_of, verify_p256, verify_signature

MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
BINDING_DOMAIN = b"commons-p256-key:v1:"


def pem_hint(public_der: bytes) -> str:
    """The bundle's `publicKey.hint`: sha256 of the key's PEM text, as `model_signing` computes it."""
    return sha256(pem_of(public_der)).hexdigest()


@dataclass(frozen=True)
class KeyBinding:
    """The ed25519 identity's signature over the P-256 key that signs its bundles."""

    ed25519: str  # hex public key: the signer trust policy, index and announcements know
    p256: bytes  # SubjectPublicKeyInfo DER
    sig: bytes  # ed25519 over BINDING_DOMAIN + p256

    @classmethod
    def of(cls, identity: Identity) -> KeyBinding:
        der = identity.p256.public_der
        return cls(identity.public_hex, der, identity.sign(BINDING_DOMAIN + der))

    def to_dict(self) -> dict:
        return {
            "ed25519": self.ed25519,
            "p256": base64.b64encode(self.p256).decode(),
            "sig": base64.b64encode(self.sig).decode(),
        }

    @classmethod
    def parse(cls, value: Any) -> KeyBinding:
        """A binding whose ed25519 signature holds; VerifyError (one line) naming what is wrong."""
        exact_keys(value, {"ed25519", "p256", "sig"}, "model.sig commons.signer")
        identity = value["ed25519"]
        if type(identity) is not str or len(identity) != 64 or identity.strip("0123456789abcdef"):
            raise VerifyError(
                "model.sig commons.signer.ed25519 must be the signer's public key in lowercase hex"
            )
        der = b64_field(value["p256"], "model.sig commons.signer.p256")
        if p256_public_key(der) is None:
            raise VerifyError(
                "model.sig commons.signer.p256 is not a P-256 public key; re-sign with `commons sign`"
            )
        sig = b64_field(value["sig"], "model.sig commons.signer.sig")
        if not verify_signature(bytes.fromhex(identity), BINDING_DOMAIN + der, sig):
            raise VerifyError(
                f"signature check failed for key {identity[:16]}…: it did not vouch for this P-256 key"
            )
        return cls(identity, der, sig)


def sign_bundle(payload: bytes, identity: Identity) -> dict:
    """The bundle over `payload` (a statement carrying `KeyBinding.of(identity)`), signed by its P-256 key."""
    key = identity.p256
    sig = key.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"keyid": "", "sig": base64.b64encode(sig).decode()}],
        },
        "mediaType": MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": pem_hint(key.public_der)}, "tlogEntries": []},
    }


def is_bundle(document: Any) -> bool:
    return isinstance(document, dict) and "mediaType" in document


def payload_of(document: dict) -> bytes:
    """The signed statement's bytes in a parsed model.sig of either format, NOT verified."""
    dsse = document["dsseEnvelope"] if is_bundle(document) else document
    return base64.b64decode(dsse["payload"])


def open_signature(data: bytes) -> tuple[bytes, str, bool]:
    """(payload, signer hex, is_bundle) of a model.sig in either format, once its signatures hold.

    Raises VerifyError (one line) for anything oversized, not canonical JSON, of unknown shape, or whose
    signature, key binding or key hint does not check out. Trust is the caller's business.
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise VerifyError(
            f"model.sig is larger than {MAX_ENVELOPE_BYTES >> 20} MiB; it is not a manifest we made"
        )
    document = parse_canonical(bytes(data), "model.sig")
    if not is_bundle(document):
        payload, signer = open_envelope(bytes(data))
        return payload, signer, False
    payload, sig, hint = _bundle_parts(document)
    binding = KeyBinding.parse(_binding_field(payload))
    if hint != pem_hint(binding.p256):
        raise VerifyError("model.sig publicKey hint does not name the P-256 key it carries; it was altered")
    if not verify_p256(binding.p256, pae(PAYLOAD_TYPE, payload), sig):
        raise VerifyError(
            f"signature check failed for key {binding.ed25519[:16]}…: model.sig was altered or signed by "
            "someone else"
        )
    return payload, binding.ed25519, True


def _bundle_parts(document: dict) -> tuple[bytes, bytes, str]:
    """(payload, ECDSA signature, key hint) of a bundle exactly as `sign_bundle` lays it out."""
    exact_keys(document, {"dsseEnvelope", "mediaType", "verificationMaterial"}, "model.sig")
    if document["mediaType"] != MEDIA_TYPE:
        raise VerifyError(f"model.sig mediaType must be {MEDIA_TYPE}; this is not a bundle we read")
    material = document["verificationMaterial"]
    exact_keys(material, {"publicKey", "tlogEntries"}, "model.sig verificationMaterial")
    exact_keys(material["publicKey"], {"hint"}, "model.sig publicKey")
    hint = material["publicKey"]["hint"]
    if type(hint) is not str or len(hint) != 64 or hint.strip("0123456789abcdef"):
        raise VerifyError("model.sig publicKey hint must be 64 lowercase hex; it was altered")
    if material["tlogEntries"] != []:
        raise VerifyError("model.sig carries transparency log entries; a key-signed bundle has none")
    envelope = document["dsseEnvelope"]
    exact_keys(envelope, {"payload", "payloadType", "signatures"}, "model.sig dsseEnvelope")
    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise VerifyError(f"model.sig payloadType must be {PAYLOAD_TYPE!r}; this is not a model signature")
    signatures = envelope["signatures"]
    if type(signatures) is not list or len(signatures) != 1:
        raise VerifyError("model.sig must carry exactly one signature; re-sign it with `commons sign`")
    exact_keys(signatures[0], {"keyid", "sig"}, "model.sig signature")
    if signatures[0]["keyid"] != "":
        raise VerifyError("model.sig keyid must be empty in a bundle (the key is named by its hint)")
    sig = b64_field(signatures[0]["sig"], "model.sig signature")
    return b64_field(envelope["payload"], "model.sig payload"), sig, hint


def _binding_field(payload: bytes) -> Any:
    """`predicate.commons.signer` of the statement, checked only for being there."""
    statement = parse_canonical(payload, "model.sig payload")
    predicate = statement.get("predicate") if isinstance(statement, dict) else None
    commons = predicate.get("commons") if isinstance(predicate, dict) else None
    if not isinstance(commons, dict) or "signer" not in commons:
        raise VerifyError("model.sig names no P-256 key (commons.signer); re-sign it with `commons sign`")
    return commons["signer"]
