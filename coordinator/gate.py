"""The coordinator's public door: volunteers reach the Fleet API, nobody reaches anything else.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr supernode register`)
and the Runtime API (the ServerApp's own link) on one HTTP port. Exposed, that port lets a stranger
submit a run whose ServerApp executes on the coordinator, or register a key past a closed campaign's
volunteer list. So the SuperLink binds to loopback, where only the coordinator's admin reaches it, and
this proxy listens where volunteers dial and forwards only the Fleet API's calls:

    volunteer ──▶ gate (HOST:PORT, TLS in closed campaigns) ──▶ SuperLink (127.0.0.1, loopback only)
                   /v1/fleet/<one of FLEET> ✓, everything else 404         ▲
    coordinator admin: flwr run / supernode register ──────────────────────┘

Closed campaigns: the gate terminates TLS with the campaign's certificate and speaks TLS to the
SuperLink; SuperNode authentication rides in request headers, which pass through unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
from pathlib import Path

import httpx

log = logging.getLogger("commons.gate")

FLEET = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
})
PREFIX = "/v1/fleet/"
MAX_BODY = 512 * 1024 * 1024  # one Flower object; a 7B rank-64 adapter shard stays far below
# hop-by-hop and recomputed headers; everything else (Flower's version and node-auth headers) passes
_DROP = frozenset({b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"})


def allowed(method: str, path: str) -> bool:
    """Only POSTs to the Fleet API's known calls."""
    return method == "POST" and path.startswith(PREFIX) and path[len(PREFIX):] in FLEET


class Gate:
    """An ASGI app forwarding allowed calls to `upstream` (the SuperLink's loopback URL)."""

    def __init__(self, upstream: str, ca: Path | None = None) -> None:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else False
        self.client = httpx.AsyncClient(
            base_url=upstream, verify=verify, limits=httpx.Limits(max_connections=4096),
            timeout=httpx.Timeout(connect=10, read=600, write=600, pool=None),
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.client)
            return
        if scope["type"] != "http":
            return
        if not allowed(scope["method"], scope["path"]):
            log.info("refused %s %s from %s", scope["method"], scope["path"],
                     (scope.get("client") or ["?"])[0])
            await _reply(send, 404, {"detail": "this port serves only the Fleet API (volunteers); "
                                               "run submission and registration are the coordinator's own"})
            return
        body = await _body(receive)
        if body is None:
            await _reply(send, 413, {"detail": f"request body over {MAX_BODY} bytes"})
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _DROP]
        try:
            request = self.client.build_request("POST", scope["path"], headers=headers, content=body)
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await _reply(send, 502, {"detail": f"the SuperLink did not answer: {type(exc).__name__}"})
            return
        try:
            out = [(k.encode(), v.encode()) for k, v in response.headers.items()
                   if k.lower().encode() not in _DROP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _body(receive) -> bytes | None:
    parts, size = [], 0
    while True:
        event = await receive()
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        parts.append(chunk)
        if not event.get("more_body"):
            return b"".join(parts)


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _lifespan(receive, send, client: httpx.AsyncClient) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m coordinator.gate", description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback URL, http(s)://127.0.0.1:PORT")
    parser.add_argument("--certfile", type=Path, help="closed campaigns: the certificate volunteers verify")
    parser.add_argument("--keyfile", type=Path)
    parser.add_argument("--ca", type=Path,
                        help="closed campaigns: the CA the SuperLink's certificate is under")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(Gate(args.upstream, args.ca), host=args.host, port=args.port, log_level="warning",
                ssl_certfile=str(args.certfile) if args.certfile else None,
                ssl_keyfile=str(args.keyfile) if args.keyfile else None, timeout_keep_alive=30)


if __name__ == "__main__":
    main()
