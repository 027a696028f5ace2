"""A fake Kubo RPC daemon on loopback, faithful to the documented API where our client touches it.

POST only (GET → 405, as Kubo); multipart uploads; `add` answers JSON lines {Name, Hash, Size} with CIDs
from protocol.content.unixfs; `dag/import` answers {"Root": {"Cid": {"/": ...}, "PinErrorMsg": ""}}; refusals
are HTTP 500 with {"Message", "Code": 0, "Type": "error"}. Also `serve_app`, to run any ASGI app in a thread.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from protocol.content import unixfs
from protocol.content.blockstore import BlockStore
from protocol.content.car import read_car, write_car
from protocol.errors import CommonsError


def multipart_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(filename, content) of each part; enough of RFC 7578 for what httpx and Kubo's CLI send."""
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    out = []
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, content = part.partition(b"\r\n\r\n")
        name = head.split(b'filename="')[1].split(b'"')[0].decode() if b'filename="' in head else ""
        out.append((name, content[:-2] if content.endswith(b"\r\n") else content))
    return out


def _error(message: str, status: int = 500) -> JSONResponse:
    return JSONResponse({"Message": message, "Code": 0, "Type": "error"}, status_code=status)


class FakeKubo:
    def __init__(self, root: Path, lie_about_root: bool = False) -> None:
        self.store = BlockStore(root)
        self.pins: set[str] = set()
        self.provided: set[str] = set()
        self.lie_about_root = lie_about_root
        self.app = Starlette(routes=[Route("/api/v0/{command:path}", self.dispatch,
                                           methods=["GET", "POST", "PUT"])])

    async def dispatch(self, request: Request) -> Response:
        if request.method != "POST":
            return PlainTextResponse("405 - Method Not Allowed", status_code=405)
        handler = getattr(self, "cmd_" + request.path_params["command"].replace("/", "_"), None)
        if handler is None:
            return PlainTextResponse("404 page not found", status_code=404)
        try:
            return await handler(request)
        except CommonsError as exc:
            return _error(str(exc))

    async def cmd_version(self, request: Request) -> Response:
        return JSONResponse({"Version": "0.32.1", "Commit": "fake", "Repo": "16", "System": "amd64/linux",
                             "Golang": "go1.23.4"})

    async def cmd_add(self, request: Request) -> Response:
        q = request.query_params
        version = int(q.get("cid-version", "0"))
        raw = q.get("raw-leaves", "true" if version == 1 else "false") == "true"
        if q.get("chunker", "size-262144") != "size-262144" or raw != (version == 1):
            return _error("this fake only implements the default chunker and leaf type per CID version")
        lines = []
        for name, content in multipart_files(await request.body(), request.headers["content-type"]):
            sizes: list[int] = []

            def keep(cid: str, block: bytes, sizes: list[int] = sizes) -> None:
                self.store.put(cid, block)
                sizes.append(len(block))

            cid = unixfs.import_file(content, version, keep)
            if q.get("pin", "true") == "true":
                self.pins.add(cid)
            lines.append({"Name": name, "Hash": cid, "Size": str(sum(sizes))})
        return Response("".join(json.dumps(line) + "\n" for line in lines), media_type="application/json")

    async def cmd_cat(self, request: Request) -> Response:
        cid = request.query_params["arg"]
        if not self.store.has(cid):
            return _error(f"block was not found locally (offline): ipld: could not find {cid}")
        return Response(b"".join(unixfs.iter_file(self.store.get, cid)), media_type="text/plain")

    async def cmd_pin_add(self, request: Request) -> Response:
        cid = request.query_params["arg"]
        if self.store.missing(cid):
            return _error(f"pin: block was not found locally (offline): ipld: could not find {cid}")
        self.pins.add(cid)
        return JSONResponse({"Pins": [cid]})

    async def cmd_dag_import(self, request: Request) -> Response:
        lines = []
        for _name, content in multipart_files(await request.body(), request.headers["content-type"]):
            roots, blocks = read_car(io.BytesIO(content))
            for cid, block in blocks:
                self.store.put(cid, block)
            for root in roots:
                if request.query_params.get("pin-roots", "true") == "true":
                    self.pins.add(root)
                shown = unixfs.file_cid(b"something else") if self.lie_about_root else root
                lines.append({"Root": {"Cid": {"/": shown}, "PinErrorMsg": ""}})
        return Response("".join(json.dumps(line) + "\n" for line in lines), media_type="application/json")

    async def cmd_dag_export(self, request: Request) -> Response:
        cid = request.query_params["arg"]
        out = io.BytesIO()
        write_car(out, [cid], self.store.dag(cid))
        return Response(out.getvalue(), media_type="application/vnd.ipld.car")

    async def cmd_routing_provide(self, request: Request) -> Response:
        cid = request.query_params["arg"]
        if not self.store.has(cid):
            return _error(f"block {cid} not found locally, cannot provide")
        self.provided.add(cid)
        return Response(json.dumps({"Extra": "", "ID": "", "Responses": None, "Type": 4}) + "\n",
                        media_type="application/json")


@contextmanager
def serve_app(app) -> Iterator[str]:
    """Runs an ASGI app on 127.0.0.1:<free port> in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()
