"""dag-pb blocks (the protobuf node format IPFS uses for UnixFS), encoded exactly as Kubo does.

Kubo writes the Links (field 2) before Data (field 1), and every link carries its Name even when
empty, so `encode_node` does the same; the CIDs depend on those bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.content.multiformats import CID, varint_decode, varint_encode
from protocol.errors import CommonsError


@dataclass(frozen=True)
class Link:
    cid: CID
    name: str = ""
    tsize: int = 0  # cumulative size of the child DAG (its block plus all blocks below it)


def encode_link(cid_bytes: bytes, name: bytes, tsize: int) -> bytes:
    body = (
        b"\x0a" + varint_encode(len(cid_bytes)) + cid_bytes
        + b"\x12" + varint_encode(len(name)) + name
        + b"\x18" + varint_encode(tsize)
    )
    return b"\x12" + varint_encode(len(body)) + body


def encode_node(links: list[Link], data: bytes | None) -> bytes:
    parts = [encode_link(link.cid.to_bytes(), link.name.encode("utf-8"), link.tsize) for link in links]
    if data is not None:
        parts.append(b"\x0a" + varint_encode(len(data)) + data)
    return b"".join(parts)


def _fields(buf: bytes | memoryview) -> list[tuple[int, int, object]]:
    """Protobuf fields as (number, wire type, int value or bytes); only varint and bytes wire types."""
    out: list[tuple[int, int, object]] = []
    pos = 0
    while pos < len(buf):
        key, pos = varint_decode(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint_decode(buf, pos)
            out.append((number, wire, value))
        elif wire == 2:
            length, pos = varint_decode(buf, pos)
            if pos + length > len(buf):
                raise CommonsError("truncated protobuf field: the block is corrupt, fetch it again")
            out.append((number, wire, bytes(buf[pos:pos + length])))
            pos += length
        else:
            raise CommonsError(f"unexpected protobuf wire type {wire}: the block is not dag-pb")
    return out


def decode_node(block: bytes | memoryview) -> tuple[list[Link], bytes | None]:
    """Returns (links, data); data is None when the field is absent."""
    links: list[Link] = []
    data: bytes | None = None
    for number, wire, value in _fields(block):
        if number == 2 and wire == 2:
            links.append(_decode_link(value))  # type: ignore[arg-type]
        elif number == 1 and wire == 2:
            data = value  # type: ignore[assignment]
        else:
            raise CommonsError(f"unexpected dag-pb field {number}: the block is not dag-pb")
    return links, data


def _decode_link(buf: bytes) -> Link:
    cid: CID | None = None
    name, tsize = "", 0
    for number, _wire, value in _fields(buf):
        if number == 1:
            cid = CID.decode(value)  # type: ignore[arg-type]
        elif number == 2:
            name = value.decode("utf-8", "replace")  # type: ignore[union-attr]
        elif number == 3:
            tsize = value  # type: ignore[assignment]
    if cid is None:
        raise CommonsError("dag-pb link without a Hash: the block is corrupt, fetch it again")
    return Link(cid, name, tsize)
