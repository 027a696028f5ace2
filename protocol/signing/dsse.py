"""DSSE envelopes (https://github.com/secure-systems-lab/dsse) in exactly one byte encoding.

    >>> env = sign_envelope(canonical_json(statement), identity)   # dict
    >>> payload, signer = open_envelope(envelope_bytes(env))        # raises VerifyError unless valid

A bare envelope signed by ed25519 is how model.sig was written before bundles (`bundle.py` wraps the
same envelope, signed by P-256); `open_envelope` keeps those files verifying. `bench/` still signs with
`sign_envelope`.

Both the envelope and the in-toto payload are canonical JSON: sorted keys, no spaces, UTF-8, no NaN.
Opening re-encodes what it parsed and refuses anything that is not byte-identical, so one signed
statement has exactly one accepted envelope: reordered keys, extra whitespace, duplicate keys,
alternative base64 or escapes are all refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from protocol.errors import VerifyError
from protocol.signing.keys import Identity, verify_signature

PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(value: Any) -> bytes:
    """The one encoding we sign and accept. Raises ValueError on NaN/Infinity or unencodable strings."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature actually covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign_envelope(payload: bytes, identity: Identity, payload_type: str = PAYLOAD_TYPE) -> dict:
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {
                "keyid": identity.public_hex,
                "sig": base64.b64encode(identity.sign(pae(payload_type, payload))).decode(),
            }
        ],
    }


def envelope_bytes(envelope: dict) -> bytes:
    return canonical_json(envelope)


def parse_canonical(data: bytes, what: str) -> Any:
    """Parse JSON strictly and insist it is already in canonical form."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise VerifyError(f"{what} is not UTF-8 text; re-download it") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as exc:
        raise VerifyError(
            f"{what} has the JSON key {exc.args[0]} twice; it was altered, re-download it"
        ) from None
    except RecursionError:
        raise VerifyError(f"{what} is nested too deeply; it is not a manifest we made") from None
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "bad number"
        raise VerifyError(f"{what} is not valid JSON ({reason[:60]}); re-download it") from None
    try:
        again = canonical_json(value)
    except (ValueError, RecursionError):
        again = b""
    if again != data:
        raise VerifyError(
            f"{what} is not in canonical form (sorted keys, no spaces, UTF-8); it was altered or made by "
            "another tool, re-sign it with `commons sign`"
        )
    return value


def open_envelope(data: bytes, payload_type: str = PAYLOAD_TYPE) -> tuple[bytes, str]:
    """Check structure and signature; return (payload bytes, signer hex). Trust is the caller's business."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise VerifyError(
            f"model.sig is larger than {MAX_ENVELOPE_BYTES >> 20} MiB; it is not a manifest we made"
        )
    env = parse_canonical(bytes(data), "model.sig")
    exact_keys(env, {"payloadType", "payload", "signatures"}, "model.sig")
    if env["payloadType"] != payload_type:
        raise VerifyError(f"model.sig payloadType must be {payload_type!r}; this is not a model signature")
    payload = b64_field(env["payload"], "model.sig payload")
    signatures = env["signatures"]
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise VerifyError("model.sig must carry exactly one signature; re-sign it with `commons sign`")
    exact_keys(signatures[0], {"keyid", "sig"}, "model.sig signature")
    keyid, sig = signatures[0]["keyid"], b64_field(signatures[0]["sig"], "model.sig signature")
    if not isinstance(keyid, str) or not _HEX64.fullmatch(keyid):
        raise VerifyError("model.sig keyid must be the signer's ed25519 public key in lowercase hex")
    if len(sig) != 64 or not verify_signature(bytes.fromhex(keyid), pae(payload_type, payload), sig):
        raise VerifyError(
            f"signature check failed for key {keyid[:16]}…: model.sig was altered or signed by someone else"
        )
    return payload, keyid


def exact_keys(value: Any, keys: set[str], what: str) -> None:
    if not isinstance(value, dict):
        raise VerifyError(f"{what} must be a JSON object; it is not a manifest we made")
    missing, extra = sorted(keys - value.keys()), sorted(value.keys() - keys)
    if missing:
        raise VerifyError(f"{what} is missing the field {missing[0][:40]!r}; re-sign it with `commons sign`")
    if extra:
        raise VerifyError(f"{what} has an unknown field {extra[0][:40]!r}; it was altered, re-download it")


def b64_field(value: Any, what: str) -> bytes:
    """Standard padded base64 in its one encoding; VerifyError naming `what` otherwise."""
    if not isinstance(value, str):
        raise VerifyError(f"{what} must be a base64 string; it was altered, re-download it")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise VerifyError(f"{what} is not valid base64; it was altered, re-download it") from None
    if base64.b64encode(raw).decode() != value:  # one encoding only: no stray padding bits
        raise VerifyError(f"{what} is not canonical base64; it was altered, re-download it")
    return raw


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(repr(key)[:40])
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
