"""Pinning Service API client against a fake service on loopback that follows the spec's shapes."""

from __future__ import annotations

import itertools
import socket

import pytest
from fake_kubo import serve_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.content import unixfs
from protocol.content.pinning import PinningClient
from protocol.errors import CommonsError

TOKEN = "secret-token"
GOOD = unixfs.file_cid(b"adapter weights")
UNREACHABLE = unixfs.file_cid(b"nobody has this")


class FakePinningService:
    """Pins advance queued → pinning → pinned one step per status read; UNREACHABLE ends failed."""

    def __init__(self) -> None:
        self.pins: dict[str, dict] = {}
        self.ids = itertools.count(1)
        self.app = Starlette(routes=[
            Route("/pins", self.pins_root, methods=["GET", "POST"]),
            Route("/pins/{requestid}", self.pin_one, methods=["GET", "POST", "DELETE"]),
        ])

    def _auth(self, request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"error": {"reason": "UNAUTHORIZED", "details": "Access token is invalid"}},
                                401)
        return None

    async def pins_root(self, request: Request) -> Response:
        if denied := self._auth(request):
            return denied
        if request.method == "POST":
            body = await request.json()
            if "cid" not in body:
                return JSONResponse({"error": {"reason": "BAD_REQUEST", "details": "cid is required"}}, 400)
            requestid = f"req-{next(self.ids)}"
            self.pins[requestid] = {"requestid": requestid, "status": "queued",
                                    "created": "2026-01-01T00:00:00Z",
                                    "pin": {k: body[k] for k in ("cid", "name", "origins", "meta")
                                            if k in body},
                                    "delegates": ["/ip4/203.0.113.1/tcp/4001/p2p/QmService"], "info": {}}
            return JSONResponse(self.pins[requestid], 202)
        cid = request.query_params.get("cid")
        results = [p for p in self.pins.values() if cid is None or p["pin"]["cid"] in cid.split(",")]
        return JSONResponse({"count": len(results), "results": results})

    async def pin_one(self, request: Request) -> Response:
        if denied := self._auth(request):
            return denied
        pin = self.pins.get(request.path_params["requestid"])
        if pin is None:
            return JSONResponse({"error": {"reason": "NOT_FOUND", "details": "no such pin request"}}, 404)
        if request.method == "DELETE":
            del self.pins[pin["requestid"]]
            return Response(status_code=202)
        pin["status"] = {"queued": "pinning", "pinning": "pinned"}.get(pin["status"], pin["status"])
        if pin["pin"]["cid"] == UNREACHABLE and pin["status"] == "pinned":
            pin["status"], pin["info"] = "failed", {"status_details": "no provider found for the CID"}
        return JSONResponse(pin)


@pytest.fixture
def service():
    fake = FakePinningService()
    with serve_app(fake.app) as url:
        fake.url = url
        yield fake


def test_pin_poll_list_remove(service):
    waits: list[float] = []
    with PinningClient(service.url, TOKEN) as client:
        status = client.add(GOOD, name="math-lora@3", origins=["/ip4/10.0.0.1/tcp/4051/p2p/12D3KooWx"],
                            meta={"version": 3})
        assert status.status == "queued" and status.cid == GOOD and status.name == "math-lora@3"
        assert service.pins[status.requestid]["pin"]["meta"] == {"version": "3"}
        done = client.wait(status.requestid, interval=0.5, sleep=waits.append)
        assert done.status == "pinned" and waits == [0.5]  # queued → pinning (slept) → pinned
        assert [p.requestid for p in client.list(cid=GOOD)] == [status.requestid]
        client.remove(status.requestid)
        assert client.list(cid=GOOD) == []


def test_failed_pin_and_bad_token_are_one_line_errors(service):
    with PinningClient(service.url, TOKEN) as client:
        status = client.add(UNREACHABLE)
        with pytest.raises(CommonsError, match=r"failed to pin .*no provider found for the CID.*origin"):
            client.wait(status.requestid, sleep=lambda s: None)
        with pytest.raises(CommonsError,
                           match=r"refused status of req-404 \(HTTP 404: NOT_FOUND: no such pin"):
            client.get("req-404")
    with pytest.raises(CommonsError,
                       match=r"refused the token \(401 UNAUTHORIZED: Access token is invalid\): "
                             r"check --pinning-token"):
        PinningClient(service.url, "wrong").add(GOOD)
    with pytest.raises(CommonsError, match="no pinning service token"):
        PinningClient(service.url, "")


def test_wait_gives_up_at_the_timeout(service):
    with PinningClient(service.url, TOKEN) as client:
        status = client.add(GOOD)
        with pytest.raises(CommonsError, match=r"still pinning after 0s: check later with request id req-1"):
            client.wait(status.requestid, timeout=0.0, sleep=lambda s: None)


def test_no_service_listening():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(CommonsError, match="no pinning service at .*: check the endpoint URL"):
        PinningClient(url, TOKEN).list()
