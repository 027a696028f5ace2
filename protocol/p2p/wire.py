"""Length-prefixed frames (unsigned varint + payload) on a libp2p stream, and a pacer for serving."""

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

    def __init__(self, stream: INetStream, max_frame: int = MAX_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
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
        if size > self.max_frame:
            raise FrameError(f"frame of {size} bytes exceeds {self.max_frame}")
        while len(self.buf) < used + size:
            await self._more()
        payload = bytes(self.buf[used:used + size])
        del self.buf[:used + size]
        return payload


class Pacer:
    """Caps the bytes/s a node serves, shared by every stream, peer and protocol it serves on."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.until = 0.0  # when the bytes sent so far have "left" at `rate`

    async def pace(self, size: int) -> None:
        self.until = max(self.until, trio.current_time()) + size / self.rate
        await trio.sleep_until(self.until)
