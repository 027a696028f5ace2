"""Signed announcements: typed bodies, one canonical JSON encoding, ed25519 detached signatures.

    >>> wire = sign(AdapterAnnouncement(cid, "math-lora", 3, envelope, providers=addrs), identity)
    >>> checker = Checker()
    >>> signed = checker.check(wire, TOPIC_ADAPTERS)   # VerifyError: forged, stale, replayed, malformed

The signature covers `DOMAIN + canonical({kind, body, signer, timestamp, nonce})`, so a message cannot
be moved to another topic or kind, and any field changed in transit breaks it. Receivers keep the
(signer, nonce) pairs seen within the time window: a replay inside the window is a duplicate, one
outside it is stale.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from protocol.errors import VerifyError
from protocol.signing.keys import peer_id_from_public_key, verify_signature

DOMAIN = b"commons-announce/1\n"
TOPIC_ADAPTERS = "commons/adapters/1"
TOPIC_DATASETS = "commons/datasets/1"
TOPIC_PRESENCE = "commons/presence/1"
WINDOW_S = 300
MAX_MESSAGE = 256 * 1024


@dataclass(frozen=True)
class AdapterAnnouncement:
    """A new adapter version; `envelope` is its DSSE `model.sig` (JSON text); providers hold the blocks."""

    cid: str
    name: str
    version: int
    envelope: str
    providers: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "adapter"
    topic: ClassVar[str] = TOPIC_ADAPTERS


@dataclass(frozen=True)
class DatasetAnnouncement:
    cid: str
    name: str
    license: str
    providers: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "dataset"
    topic: ClassVar[str] = TOPIC_DATASETS


@dataclass(frozen=True)
class PresenceAnnouncement:
    """A node says it is up: its peer id, what it offers ("seed", "train", "index"), where to dial it."""

    peer_id: str
    capability: str
    addrs: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "presence"
    topic: ClassVar[str] = TOPIC_PRESENCE


Announcement = AdapterAnnouncement | DatasetAnnouncement | PresenceAnnouncement
KINDS: dict[str, type] = {
    cls.kind: cls for cls in (AdapterAnnouncement, DatasetAnnouncement, PresenceAnnouncement)
}
_TYPES = {"str": str, "int": int, "list[str]": list}


@dataclass(frozen=True)
class Signed:
    body: Announcement
    signer: str  # hex ed25519 public key
    timestamp: int  # unix seconds
    nonce: str  # 16 random bytes, hex

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(bytes.fromhex(self.signer))


def canonical(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _unsigned(kind: str, body: dict, signer: str, timestamp: int, nonce: str) -> dict:
    return {"kind": kind, "body": body, "signer": signer, "timestamp": timestamp, "nonce": nonce}


def sign(body: Announcement, identity, now: float | None = None) -> bytes:
    """Wire bytes of `body` signed by `identity` (a protocol.signing.keys.Identity)."""
    timestamp = int(now if now is not None else time.time())
    message = _unsigned(body.kind, asdict(body), identity.public_hex, timestamp, os.urandom(16).hex())
    signature = identity.sign(DOMAIN + canonical(message))
    return canonical({**message, "signature": signature.hex()})


def _body(kind: object, body: object) -> Announcement:
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None or not isinstance(body, dict):
        raise VerifyError(f"unknown announcement kind {kind!r}: dropped")
    wanted = {f.name: f for f in fields(cls)}
    if set(body) != set(wanted):
        raise VerifyError(f"{kind} announcement has fields {sorted(body)}, expected {sorted(wanted)}: "
                          "dropped")
    for name, spec in wanted.items():
        value = body[name]
        typ = _TYPES[spec.type if isinstance(spec.type, str) else spec.type.__name__]
        if not isinstance(value, typ) or isinstance(value, bool) or (
            typ is list and not all(isinstance(item, str) for item in value)
        ):
            raise VerifyError(f"{kind} announcement field {name!r} has the wrong type: dropped")
    return cls(**body)


def decode(data: bytes, topic: str) -> Signed:
    """Parses and verifies the signature; VerifyError (one line) on anything malformed or forged."""
    if len(data) > MAX_MESSAGE:
        raise VerifyError(f"announcement of {len(data)} bytes exceeds {MAX_MESSAGE}: dropped")
    try:
        message = json.loads(data)
        signature = bytes.fromhex(message.pop("signature"))
        signer, timestamp, nonce = message["signer"], message["timestamp"], message["nonce"]
        public_key = bytes.fromhex(signer)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise VerifyError("malformed announcement (not our signed JSON): dropped") from None
    if set(message) != {"kind", "body", "signer", "timestamp", "nonce"} or not isinstance(timestamp, int) \
            or not isinstance(nonce, str) or len(public_key) != 32:
        raise VerifyError("malformed announcement envelope: dropped")
    body = _body(message["kind"], message["body"])
    if body.topic != topic:
        raise VerifyError(f"{body.kind} announcement arrived on {topic}, belongs on {body.topic}: dropped")
    unsigned = _unsigned(body.kind, message["body"], signer, timestamp, nonce)
    if not verify_signature(public_key, DOMAIN + canonical(unsigned), signature):
        raise VerifyError(f"bad signature on {body.kind} announcement from {signer[:16]}…: dropped")
    signed = Signed(body, signer, timestamp, nonce)
    if isinstance(body, PresenceAnnouncement) and body.peer_id != signed.peer_id:
        raise VerifyError(f"presence for {body.peer_id} signed by another key ({signed.peer_id}): dropped")
    return signed


class Checker:
    """decode() plus freshness: drops stale messages and replays of a (signer, nonce) already seen."""

    def __init__(self, window_s: int = WINDOW_S) -> None:
        self.window_s = window_s
        self.seen: dict[tuple[str, str], int] = {}

    def check(self, data: bytes, topic: str, now: float | None = None) -> Signed:
        now = time.time() if now is None else now
        signed = decode(data, topic)
        if abs(now - signed.timestamp) > self.window_s:
            raise VerifyError(
                f"stale {signed.body.kind} announcement ({int(now - signed.timestamp)}s old, window "
                f"{self.window_s}s): dropped; check the sender's clock"
            )
        key = (signed.signer, signed.nonce)
        if key in self.seen:
            raise VerifyError(f"replayed {signed.body.kind} announcement (nonce {signed.nonce[:8]}…): "
                              "dropped")
        self._forget_before(now - self.window_s)
        self.seen[key] = signed.timestamp
        return signed

    def _forget_before(self, cutoff: float) -> None:
        # Entries older than the window can go: the timestamp check alone refuses their replays.
        for key in [k for k, ts in self.seen.items() if ts < cutoff]:
            del self.seen[key]
