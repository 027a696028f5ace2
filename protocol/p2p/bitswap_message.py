"""The bitswap wire message (https://specs.ipfs.tech/bitswap-protocol/), protobuf encoded by hand.

    message Message {
      message Wantlist {
        enum WantType { Block = 0; Have = 1; }
        message Entry {
          bytes block = 1;         // binary CID
          int32 priority = 2;
          bool cancel = 3;
          WantType wantType = 4;   // 1.2.0
          bool sendDontHave = 5;   // 1.2.0
        }
        repeated Entry entries = 1;
        bool full = 2;             // replaces the peer's whole wantlist
      }
      message Block { bytes prefix = 1; bytes data = 2; }  // prefix: CID version, codec, hash, length
      enum BlockPresenceType { Have = 0; DontHave = 1; }
      message BlockPresence { bytes cid = 1; BlockPresenceType type = 2; }
      Wantlist wantlist = 1;
      repeated bytes blocks = 2;                  // 1.0.0: CIDv0 blocks, no prefix
      repeated Block payload = 3;                 // 1.1.0 and 1.2.0
      repeated BlockPresence blockPresences = 4;  // 1.2.0
      int32 pendingBytes = 5;
    }

A received block's CID is computed (prefix + sha2-256 of its data), never taken on trust, so a
block can only ever answer the want for the bytes it is.

    >>> wire = Message(wantlist=[Entry(cid, send_dont_have=True)]).encode(BITSWAP_120)
    >>> Message.decode(wire).wantlist[0].cid == cid
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from protocol.content.multiformats import CID, DAG_PB, SHA2_256, varint_decode, varint_encode
from protocol.errors import CommonsError

BITSWAP_120 = "/ipfs/bitswap/1.2.0"
BITSWAP_110 = "/ipfs/bitswap/1.1.0"
BITSWAP_100 = "/ipfs/bitswap/1.0.0"
WANT_BLOCK, WANT_HAVE = 0, 1
HAVE, DONT_HAVE = 0, 1
MAX_BLOCK = 2 << 20  # the spec's limit; larger blocks are dropped unread


class MessageError(CommonsError):
    """A message that is not bitswap protobuf: the stream it came on is dropped."""


@dataclass(frozen=True)
class Entry:
    cid: CID
    want_type: int = WANT_BLOCK
    send_dont_have: bool = False
    cancel: bool = False
    priority: int = 1


@dataclass
class Message:
    wantlist: list[Entry] = field(default_factory=list)
    full: bool = False
    blocks: list[tuple[CID, bytes]] = field(default_factory=list)
    presences: list[tuple[CID, int]] = field(default_factory=list)
    pending_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.wantlist or self.blocks or self.presences or self.full)

    def encode(self, protocol: str = BITSWAP_120) -> bytes:
        """The message as `protocol` carries it: 1.0.0 and 1.1.0 drop want types and presences."""
        newest = protocol == BITSWAP_120
        parts: list[bytes] = []
        if self.wantlist or self.full:
            kept = [e for e in self.wantlist if newest or e.want_type == WANT_BLOCK]
            entries = [_field(1, _entry(e, newest)) for e in kept]
            parts.append(_field(1, b"".join(entries) + (b"\x10\x01" if self.full else b"")))
        for cid, data in self.blocks:  # headers, then the data itself: each block is copied once, by join
            if protocol == BITSWAP_100:
                parts += [_header(2, len(data)), data]
            else:
                prefix = _field(1, _prefix(cid))
                parts += [_header(3, len(prefix) + len(_header(2, len(data))) + len(data)), prefix,
                          _header(2, len(data)), data]
        if newest:
            for cid, kind in self.presences:
                parts.append(_field(4, _field(1, cid.to_bytes()) + b"\x10" + varint_encode(kind)))
        if self.pending_bytes > 0:
            parts.append(b"\x28" + varint_encode(self.pending_bytes))
        return b"".join(parts)

    @staticmethod
    def decode(buf: bytes) -> Message:
        """MessageError for anything but a well-formed message; blocks over MAX_BLOCK or hashed with
        anything but sha2-256 are left out (we could not check them)."""
        message = Message()
        try:
            for number, value in _fields(buf):
                if number == 1 and isinstance(value, bytes):
                    _wantlist(value, message)
                elif number == 2 and isinstance(value, bytes):
                    message.blocks += _block(0, DAG_PB, value)
                elif number == 3 and isinstance(value, bytes):
                    message.blocks += _payload(value)
                elif number == 4 and isinstance(value, bytes):
                    message.presences.append(_presence(value))
                elif number == 5 and isinstance(value, int):
                    message.pending_bytes = value
        except (CommonsError, IndexError, ValueError) as exc:
            raise MessageError(f"malformed bitswap message ({exc})") from None
        return message


# ---------------------------------------------------------------- encoding


def _header(number: int, length: int) -> bytes:
    return varint_encode(number << 3 | 2) + varint_encode(length)


def _field(number: int, value: bytes) -> bytes:
    return _header(number, len(value)) + value


def _entry(entry: Entry, newest: bool) -> bytes:
    out = _field(1, entry.cid.to_bytes()) + b"\x10" + varint_encode(max(entry.priority, 0))
    if entry.cancel:
        out += b"\x18\x01"
    if newest:
        out += b"\x20" + varint_encode(entry.want_type)
        out += b"\x28\x01" if entry.send_dont_have else b""
    return out


def _prefix(cid: CID) -> bytes:
    return b"".join(varint_encode(v) for v in (cid.version, cid.codec, SHA2_256, len(cid.digest)))


# ---------------------------------------------------------------- decoding


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of every varint or length-delimited field; fixed-width ones are skipped."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = varint_decode(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = varint_decode(buf, pos)
            out.append((key >> 3, value))
        elif wire == 2:
            length, pos = varint_decode(buf, pos)
            if pos + length > len(buf):
                raise MessageError("truncated field")
            out.append((key >> 3, buf[pos:pos + length]))
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise MessageError(f"wire type {wire}")
    return out


def _wantlist(buf: bytes, message: Message) -> None:
    for number, value in _fields(buf):
        if number == 1 and isinstance(value, bytes):
            message.wantlist.append(_decode_entry(value))
        elif number == 2:
            message.full = bool(value)


def _decode_entry(buf: bytes) -> Entry:
    values = dict(_fields(buf))
    raw = values.get(1)
    if not isinstance(raw, bytes):
        raise MessageError("wantlist entry without a CID")
    want_type = values.get(4, WANT_BLOCK)
    return Entry(CID.decode(raw), want_type=WANT_HAVE if want_type == WANT_HAVE else WANT_BLOCK,
                 send_dont_have=bool(values.get(5, 0)), cancel=bool(values.get(3, 0)),
                 priority=int(values.get(2, 1)) & 0x7FFFFFFF)


def _payload(buf: bytes) -> list[tuple[CID, bytes]]:
    values = dict(_fields(buf))
    prefix, data = values.get(1, b""), values.get(2, b"")
    if not isinstance(prefix, bytes) or not isinstance(data, bytes):
        raise MessageError("block without prefix or data")
    version, pos = varint_decode(prefix, 0)
    codec, pos = varint_decode(prefix, pos)
    hash_code, pos = varint_decode(prefix, pos)
    length, _ = varint_decode(prefix, pos)
    if version not in (0, 1) or (version == 0 and codec != DAG_PB):
        raise MessageError(f"block prefix names CIDv{version} with codec 0x{codec:x}")
    if hash_code != SHA2_256 or length != 32:
        return []
    return _block(version, codec, data)


def _block(version: int, codec: int, data: bytes) -> list[tuple[CID, bytes]]:
    if len(data) > MAX_BLOCK:
        return []
    return [(CID(version, codec, hashlib.sha256(data).digest()), data)]


def _presence(buf: bytes) -> tuple[CID, int]:
    values = dict(_fields(buf))
    raw = values.get(1)
    if not isinstance(raw, bytes):
        raise MessageError("block presence without a CID")
    return CID.decode(raw), DONT_HAVE if values.get(2, HAVE) == DONT_HAVE else HAVE
