"""CARv1 files byte-identical to `ipfs dag export`, and a reader that re-hashes every block.

Example:
    >>> with open("adapter.car", "wb") as out:
    ...     write_car(out, [root], store.dag(root))
    >>> roots, blocks = read_car(open("adapter.car", "rb"))

Layout: varint(len(header)) + dag-cbor {"roots": [CID], "version": 1}, then per block
varint(len(cid bytes) + len(data)) + cid bytes + data. CARv2 files are read through their inner CARv1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from protocol.content.multiformats import CID, varint_decode, varint_encode
from protocol.errors import CommonsError, VerifyError

_CARV2_PRAGMA = bytes.fromhex("0aa16776657273696f6e02")
_MAX_SECTION = 1 << 26  # far above Kubo's 1 MiB block limit; guards against absurd lengths


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    for code, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * width):
            return bytes([major << 5 | code]) + value.to_bytes(width, "big")
    raise ValueError("value too large for CBOR")


def encode_header(roots: list[str]) -> bytes:
    """dag-cbor of {"roots": [...], "version": 1}; keys in dag-cbor order (shorter first)."""
    out = [_cbor_head(5, 2), _cbor_head(3, 5), b"roots", _cbor_head(4, len(roots))]
    for root in roots:
        raw = b"\x00" + CID.decode(root).to_bytes()  # tag 42 payload: identity multibase prefix + CID
        out += [b"\xd8\x2a", _cbor_head(2, len(raw)), raw]
    out += [_cbor_head(3, 7), b"version", _cbor_head(0, 1)]
    return b"".join(out)


def write_car(out: BinaryIO, roots: list[str], blocks: Iterable[tuple[str, bytes]]) -> None:
    header = encode_header(roots)
    out.write(varint_encode(len(header)) + header)
    for cid, data in blocks:
        raw = CID.decode(cid).to_bytes()
        out.write(varint_encode(len(raw) + len(data)))
        out.write(raw)
        out.write(data)


# --- reading ----------------------------------------------------------------------------------------


def _cbor_item(buf: bytes, pos: int) -> tuple[object, int]:
    """Just enough CBOR for CAR headers: uints, bytes, text, arrays, maps, tag 42."""
    if pos >= len(buf):
        raise CommonsError("truncated CAR header: the file is corrupt, export it again")
    first = buf[pos]
    major, info = first >> 5, first & 31
    pos += 1
    if info < 24:
        value = info
    elif info <= 27:
        width = 1 << (info - 24)
        value = int.from_bytes(buf[pos:pos + width], "big")
        pos += width
    else:
        raise CommonsError("unsupported CBOR in CAR header: not a CARv1 file")
    if major == 0:
        return value, pos
    if major in (2, 3):
        chunk = buf[pos:pos + value]
        if len(chunk) != value:
            raise CommonsError("truncated CAR header: the file is corrupt, export it again")
        return (chunk if major == 2 else chunk.decode("utf-8")), pos + value
    if major == 4:
        items = []
        for _ in range(value):
            item, pos = _cbor_item(buf, pos)
            items.append(item)
        return items, pos
    if major == 5:
        mapping = {}
        for _ in range(value):
            key, pos = _cbor_item(buf, pos)
            mapping[key], pos = _cbor_item(buf, pos)
        return mapping, pos
    if major == 6 and value == 42:
        raw, pos = _cbor_item(buf, pos)
        if not isinstance(raw, bytes) or raw[:1] != b"\x00":
            raise CommonsError("malformed CID in CAR header: the file is corrupt")
        return CID.decode(raw[1:]), pos
    raise CommonsError("unsupported CBOR in CAR header: not a CARv1 file")


def _read_varint(inp: BinaryIO) -> int | None:
    """None at a clean end of file."""
    raw = bytearray()
    while True:
        byte = inp.read(1)
        if not byte:
            if raw:
                raise CommonsError("CAR file ends inside a length prefix: it is truncated, export it again")
            return None
        raw += byte
        if byte[0] < 0x80:
            return varint_decode(bytes(raw))[0]
        if len(raw) >= 10:
            raise CommonsError("bad length prefix in CAR file: it is corrupt")


def _read_exact(inp: BinaryIO, size: int) -> bytes:
    if size > _MAX_SECTION:
        raise CommonsError(f"CAR section of {size} bytes is implausibly large: the file is corrupt")
    data = inp.read(size)
    if len(data) != size:
        raise CommonsError("CAR file is truncated: export it again")
    return data


class _Limited:
    """The CARv1 payload inside a CARv2 file."""

    def __init__(self, inp: BinaryIO, size: int) -> None:
        self.inp, self.left = inp, size

    def read(self, size: int) -> bytes:
        data = self.inp.read(min(size, self.left))
        self.left -= len(data)
        return data


def read_car(inp: BinaryIO) -> tuple[list[str], Iterator[tuple[str, bytes]]]:
    """(roots, blocks); iterating the blocks raises VerifyError on the first block that mismatches its CID."""
    length = _read_varint(inp)
    if length is None:
        raise CommonsError("empty CAR file: export it again")
    header_bytes = _read_exact(inp, length)
    if varint_encode(length) + header_bytes == _CARV2_PRAGMA:
        fixed = _read_exact(inp, 40)  # characteristics, data offset, data size, index offset
        offset = int.from_bytes(fixed[16:24], "little")
        size = int.from_bytes(fixed[24:32], "little")
        if offset > len(_CARV2_PRAGMA) + 40:
            _read_exact(inp, offset - len(_CARV2_PRAGMA) - 40)  # padding before the payload
        return read_car(_Limited(inp, size))  # type: ignore[arg-type]
    header, _ = _cbor_item(header_bytes, 0)
    if (not isinstance(header, dict) or header.get("version") != 1
            or not isinstance(header.get("roots"), list)):
        raise CommonsError("not a CARv1 file (header lacks version 1 and roots): check the file")
    roots = [str(root) for root in header["roots"]]
    return roots, _blocks(inp)


def _blocks(inp: BinaryIO) -> Iterator[tuple[str, bytes]]:
    while True:
        length = _read_varint(inp)
        if length is None:
            return
        section = _read_exact(inp, length)
        cid, pos = CID.read(section)
        data = section[pos:]
        if hashlib.sha256(data).digest() != cid.digest:
            raise VerifyError(f"block {cid} in the CAR file does not match its CID: refusing the file")
        yield str(cid), data
