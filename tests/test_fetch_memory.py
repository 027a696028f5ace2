"""Big honest content in bounded memory: a pull never holds a whole level of a DAG, the index never builds a
whole CAR before sending it; and an IPv6 host cannot pick a fresh rate-limit bucket per address."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from pathlib import Path

import httpx
from live_index import serve_index

from index.ratelimit import TokenBucket, WriteRateLimit, client_key
from protocol.content import unixfs
from protocol.content.blockstore import BlockStore
from protocol.content.fetch import fetch_dag
from protocol.content.gateway import GatewaySource

SIZE = 48 << 20


def peak_while(action) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fetching_a_big_file_holds_a_few_blocks_not_the_file(tmp_path: Path) -> None:
    with serve_index(tmp_path / "index") as index:
        (tmp_path / "big.safetensors").write_bytes(os.urandom(SIZE))
        cid = index.store.add_path(tmp_path / "big.safetensors")
        mine = BlockStore(tmp_path / "mine")
        source = GatewaySource(index.url)
        peak = peak_while(lambda: fetch_dag(cid, mine, [source], progress=False,
                                            bounds=unixfs.file_bounds(SIZE)))
        source.close()
    assert mine.missing(cid) == []
    assert peak < SIZE // 3, f"peak {peak >> 20} MiB for a {SIZE >> 20} MiB file"


def test_the_index_streams_a_car_instead_of_building_it(tmp_path: Path) -> None:
    with serve_index(tmp_path / "index") as index:
        (tmp_path / "big.safetensors").write_bytes(os.urandom(SIZE))
        cid = index.store.add_path(tmp_path / "big.safetensors")

        def download() -> None:
            received = 0
            with httpx.stream("GET", f"{index.url}/ipfs/{cid}?format=car", timeout=60) as reply:
                assert reply.status_code == 200
                for piece in reply.iter_bytes():
                    received += len(piece)
            assert received > SIZE

        peak = peak_while(download)
    assert peak < SIZE // 3, f"peak {peak >> 20} MiB for a {SIZE >> 20} MiB CAR"


def test_one_ipv6_host_writes_under_one_bucket_for_its_whole_slash_64() -> None:
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:ffff") == "2001:db8::/64"
    assert client_key("2001:db8:0:1::1") != client_key("2001:db8::1")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    statuses = []

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limit = WriteRateLimit(app, TokenBucket(rate=0.001, burst=3))

    async def write(host: str) -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await limit({"type": "http", "method": "POST", "client": (host, 1234), "headers": []}, receive, send)

    for i in range(6):
        asyncio.run(write(f"2001:db8::{i + 1:x}"))
    assert statuses == [204, 204, 204, 429, 429, 429]


def test_a_gateway_that_streams_forever_costs_one_block_and_is_skipped() -> None:
    import threading
    import time

    import uvicorn
    from live_index import free_port
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    def endless(request):
        def chunks():
            while True:
                yield b"\0" * 65536

        return StreamingResponse(chunks(), media_type="application/vnd.ipld.raw")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/ipfs/{cid}", endless)]),
                                           host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    try:
        source = GatewaySource(f"http://127.0.0.1:{port}")
        start = time.monotonic()
        peak = peak_while(lambda: source.get_block("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"))
        assert time.monotonic() - start < 10 and peak < 8 << 20
        assert source.get_block("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG") is None
        source.close()
    finally:
        server.should_exit = True
