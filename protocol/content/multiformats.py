"""Multiformats we need and nothing more: unsigned varints, base58btc, base32, sha2-256 CIDs.

Example:
    >>> str(cid_for(RAW, b""))[:10]
    'bafkreihdw'
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from protocol.errors import CommonsError

DAG_PB = 0x70
RAW = 0x55
SHA2_256 = 0x12
_DIGEST_LEN = 32

_B58_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def varint_encode(value: int) -> bytes:
    if value < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_decode(buf: bytes | memoryview, offset: int = 0) -> tuple[int, int]:
    """Returns (value, offset just past the varint)."""
    value = shift = 0
    for i in range(offset, min(len(buf), offset + 10)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise CommonsError("truncated or oversized varint: the data is corrupt, fetch it again")


def b58encode(data: bytes) -> str:
    num = int.from_bytes(data, "big")
    out = bytearray()
    while num:
        num, rem = divmod(num, 58)
        out.append(_B58_ALPHABET[rem])
    pad = len(data) - len(data.lstrip(b"\0"))
    return (b"1" * pad + bytes(reversed(out))).decode("ascii")


def b58decode(text: str) -> bytes:
    num = 0
    for char in text.encode("ascii", "replace"):
        if char not in _B58_INDEX:
            raise CommonsError(f"invalid base58 character in {text!r}: check the CID was copied whole")
        num = num * 58 + _B58_INDEX[char]
    pad = len(text) - len(text.lstrip("1"))
    body = num.to_bytes((num.bit_length() + 7) // 8, "big") if num else b""
    return b"\0" * pad + body


def b32encode(data: bytes) -> str:
    """RFC 4648 base32, lower case, no padding (multibase 'b' without the prefix)."""
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def b32decode(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        return base64.b32decode(padded)
    except ValueError:
        raise CommonsError(f"invalid base32 in {text!r}: check the CID was copied whole") from None


@dataclass(frozen=True)
class CID:
    version: int
    codec: int
    digest: bytes

    def multihash(self) -> bytes:
        return bytes((SHA2_256, _DIGEST_LEN)) + self.digest

    def to_bytes(self) -> bytes:
        if self.version == 0:
            return self.multihash()
        return varint_encode(1) + varint_encode(self.codec) + self.multihash()

    def __str__(self) -> str:
        if self.version == 0:
            return b58encode(self.multihash())
        return "b" + b32encode(self.to_bytes())

    def to_v1(self) -> CID:
        return CID(1, self.codec, self.digest)

    @staticmethod
    def decode(value: str | bytes) -> CID:
        """Parses a CID string (Qm..., b..., z...) or its binary form."""
        if isinstance(value, (bytes, bytearray, memoryview)):
            cid, end = CID.read(bytes(value))
            if end != len(value):
                raise CommonsError("trailing bytes after a binary CID: the data is corrupt")
            return cid
        text = value.strip()
        text = text.removeprefix("/ipfs/")
        if len(text) == 46 and text.startswith("Qm"):
            return CID.decode(b58decode(text))
        if text[:1] in ("b", "B") and len(text) > 1:
            return CID.decode(b32decode(text[1:]))
        if text[:1] == "z" and len(text) > 1:
            return CID.decode(b58decode(text[1:]))
        raise CommonsError(f"not a CID: {value!r} (expected Qm... or b...): check what you pasted")

    @staticmethod
    def read(buf: bytes, offset: int = 0) -> tuple[CID, int]:
        """Reads one binary CID starting at offset; returns it and the offset after it."""
        if buf[offset:offset + 2] == bytes((SHA2_256, _DIGEST_LEN)):
            end = offset + 2 + _DIGEST_LEN
            if end > len(buf):
                raise CommonsError("truncated CID: the data is corrupt, fetch it again")
            return CID(0, DAG_PB, bytes(buf[offset + 2:end])), end
        version, pos = varint_decode(buf, offset)
        if version != 1:
            raise CommonsError(f"unsupported CID version {version}: only CIDv0 and CIDv1 exist")
        codec, pos = varint_decode(buf, pos)
        hash_code, pos = varint_decode(buf, pos)
        length, pos = varint_decode(buf, pos)
        if hash_code != SHA2_256 or length != _DIGEST_LEN:
            raise CommonsError(
                f"unsupported multihash 0x{hash_code:x}/{length}: re-add the content with sha2-256 (the "
                "default)"
            )
        if pos + length > len(buf):
            raise CommonsError("truncated CID: the data is corrupt, fetch it again")
        return CID(1, codec, bytes(buf[pos:pos + length])), pos + length


def cid_for(codec: int, data: bytes | memoryview, version: int = 1) -> CID:
    if version == 0 and codec != DAG_PB:
        raise CommonsError("CIDv0 can only name dag-pb blocks: use --cid-version 1")
    return CID(version, codec, hashlib.sha256(data).digest())
