"""Per-IP token buckets for writes, and a cap on request bodies: the index is on the open internet.

Both are plain ASGI middleware so they act before FastAPI reads (or buffers) a body. The address is the
connection's peer: `commons index serve` lets uvicorn replace it from X-Forwarded-For only for the proxies
named with --trust-proxy, never by default (a client would pick a fresh bucket for every write).
"""

from __future__ import annotations

import ipaddress
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second; one token per write. Keeps at most `max_keys` IPs."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when allowed, else the seconds to wait before the next token."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)  # forget the least recently seen address
        return wait


async def _reply(send: Send, status: int, detail: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def client_key(host: str) -> str:
    """The bucket an address writes under: itself for IPv4, its /64 for IPv6 (one host holds a whole /64,
    so per-address buckets would let it pick a fresh one for every write)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:  # a dual-stack socket's view of an IPv4 client
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


class WriteRateLimit:
    def __init__(self, app: ASGIApp, bucket: TokenBucket) -> None:
        self.app, self.bucket = app, bucket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in WRITE_METHODS:
            client = scope.get("client") or ("unknown", 0)
            wait = self.bucket.take(client_key(str(client[0])))
            if wait > 0:
                secs = max(1, math.ceil(wait))
                await _reply(send, 429, f"too many writes from your address; retry in {secs} s",
                             [(b"retry-after", str(secs).encode())])
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `max_bytes`, whether or not the client declared its length honestly."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request body over {self.max_bytes} bytes; send a smaller manifest"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _reply(send, 413, detail)
            return
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, detail)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _reply(send, 413, detail)


class _TooLarge(HTTPException):
    """An HTTPException so FastAPI's body parsing passes it through as a 413 instead of a generic 400."""
