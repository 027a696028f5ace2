"""Length-prefixed frames (unsigned varint + payload) on a libp2p stream."""

from __future__ import annotations

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError

from protocol.content.multiformats import varint_encode

# A block is ≤ 256 KiB + dag-pb framing; a directory node with many links stays far below this.
MAX_FRAME = 2 * 1024 * 1024
READ_SIZE = 1 << 20

# Everything a dying peer or connection can raise while we read or write.
STREAM_ERRORS = (BaseLibp2pError, OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError)


class FrameError(Exception):
    """The peer broke the framing (oversized or truncated frame)."""


def frame(payload: bytes) -> bytes:
    return varint_encode(len(payload)) + payload


def _try_varint(buf: bytearray) -> tuple[int, int] | None:
    """(value, bytes used) if buf starts with a whole varint, else None."""
    value = shift = 0
    for i, byte in enumerate(buf[:10]):
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    if len(buf) >= 10:
        raise FrameError("oversized varint")
    return None


class FrameReader:
    """Reads whole frames from a stream that hands out arbitrary byte runs."""

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _more(self) -> None:
        data = await self.stream.read(READ_SIZE)
        if not data:
            raise EOFError("stream closed")
        self.buf += data

    async def read(self) -> bytes:
        while (head := _try_varint(self.buf)) is None:
            await self._more()
        size, used = head
        if size > MAX_FRAME:
            raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME}")
        while len(self.buf) < used + size:
            await self._more()
        payload = bytes(self.buf[used:used + size])
        del self.buf[:used + size]
        return payload
