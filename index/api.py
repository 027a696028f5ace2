"""The JSON API: the same data as the pages, plus the two write doors (announce, presence).

Every integer a client sends is bounded here (a 4xx, never a database overflow), and an announcement
lists nothing until the index holds its DAG and it checks out (`index.admit`).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from index.admit import admit, settle
from index.db import ConflictError, IndexDB
from index.models import (
    Announce,
    Announced,
    EntryDetail,
    EntrySummary,
    LeaderboardRow,
    Presence,
    Resolved,
    Stats,
)
from index.present import MAX_VERSION, PRICE_PER_1K_TOKENS, detail, summary
from protocol.errors import CommonsError, VerifyError

PRESENCE_SKEW = 300  # seconds a presence timestamp may differ from our clock (replay window)
MAX_OFFSET = 1_000_000
MAX_SIZE = 2**62


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` or `name@version` (also `name@v3`)."""
    name, sep, version = ref.partition("@")
    if not sep:
        return name, None
    digits = version[1:] if version.lower().startswith("v") else version
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 16 or not 1 <= int(digits) <= MAX_VERSION:
        raise CommonsError(f"{ref[:120]!r}: the version after @ must be a number from 1 to {MAX_VERSION}, "
                           f"e.g. {name[:100]}@2")
    return name, int(digits)


def decode_envelope(value: str | dict[str, Any]) -> bytes:
    """Envelope bytes from the announce body: a JSON object, JSON text, or base64 of the bytes."""
    from protocol.signing.dsse import envelope_bytes

    if isinstance(value, dict):
        return envelope_bytes(value)
    text = value.strip()
    if text.startswith("{"):
        return text.encode()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CommonsError("envelope is neither JSON nor base64; send the bytes of model.sig base64-encoded"
                           ) from None
    if not raw.lstrip().startswith(b"{"):
        raise CommonsError("envelope decodes to something other than a JSON object; send model.sig as is")
    return raw


def check_presence(body: Presence, now: float) -> None:
    from protocol.signing.keys import parse_public_hex, verify_signature

    key = parse_public_hex(body.node)
    if abs(now - body.timestamp) > PRESENCE_SKEW:
        raise VerifyError("presence timestamp is more than 5 minutes off; check the node's clock and resend")
    try:
        sig = bytes.fromhex(body.signature)
    except ValueError:
        raise CommonsError("presence signature is not hex; sign "
                           "b'commons-presence:<node>:<timestamp>'") from None
    message = f"commons-presence:{body.node.lower()}:{body.timestamp}".encode()
    if not verify_signature(key, message, sig):
        raise VerifyError("presence signature does not verify for that node key; sign with the node's "
                          "identity")


def http_error(exc: CommonsError) -> HTTPException:
    status = 409 if isinstance(exc, ConflictError) else 403 if isinstance(exc, VerifyError) else 400
    return HTTPException(status, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def pending_reply(verified: Any, cid: str) -> JSONResponse:
    """202: held, not listed; what the publisher does next."""
    meta = verified.meta
    detail = (f"pending: {meta.name} v{meta.version} is listed once this index holds every block of {cid} "
              "and they carry this model.sig; push them (`commons p2p announce`, or `commons car import` "
              "here)")
    return JSONResponse({"cid": str(cid), "name": meta.name, "version": meta.version,
                         "signer": verified.signer, "url": None, "status": "pending", "detail": detail},
                        status_code=202)


def make_router(db: IndexDB, store: Any) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["index"])

    @api.get("/adapters", response_model=list[EntrySummary], summary="Search adapters (latest versions)")
    def adapters(q: str = Query("", max_length=200), base_model: str | None = None,
                 license: str | None = None, task: str | None = None, trusted: bool | None = None,
                 max_size: int | None = Query(None, ge=0, le=MAX_SIZE), limit: int = Query(50, ge=1, le=500),
                 offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> list[dict]:
        found = db.search(q, base_model=base_model or None, license=license or None, task=task or None,
                          trusted=trusted, max_size=max_size, limit=limit, offset=offset)
        return [summary(e) for e in found]

    @api.get("/adapters/{name}", response_model=EntryDetail, summary="One adapter with provenance and files")
    def adapter(name: str, version: int | None = Query(None, ge=1, le=MAX_VERSION)) -> dict:
        try:
            return detail(db, db.resolve(name, version))
        except CommonsError as exc:
            raise HTTPException(404, str(exc)) from None

    @api.get("/resolve/{ref}", response_model=Resolved, summary="name or name@version → CID")
    def resolve(ref: str) -> dict:
        try:
            name, version = parse_ref(ref)
        except CommonsError as exc:
            raise http_error(exc) from None
        settle(db, store, name)  # a pending announcement whose DAG arrived meanwhile is listed now
        try:
            return detail(db, db.resolve(name, version))
        except CommonsError as exc:
            raise HTTPException(404, str(exc)) from None

    @api.get("/datasets", response_model=list[EntrySummary], summary="Search datasets")
    def datasets(q: str = Query("", max_length=200), license: str | None = None,
                 limit: int = Query(50, ge=1, le=500)) -> list[dict]:
        return [summary(e) for e in db.search(q, license=license or None, kind="dataset", limit=limit)]

    @api.get("/stats", response_model=Stats, summary="Network totals")
    def stats() -> dict:
        s = db.stats()
        return {**s, "cost_usd": round(s["tokens"] / 1000 * PRICE_PER_1K_TOKENS, 2)}

    @api.get("/leaderboard", response_model=list[LeaderboardRow], summary="Volunteers by training tokens")
    def leaderboard(limit: int = Query(100, ge=1, le=1000)) -> list[dict]:
        return db.leaderboard(limit)

    @api.post("/announce", response_model=Announced, status_code=201,
              summary="Register a signed manifest (DSSE envelope) under its directory CID",
              responses={202: {"model": Announced,
                               "description": "pending: the index does not hold the DAG yet"}})
    def announce(body: Announce, request: Request) -> Any:
        try:
            envelope = decode_envelope(body.envelope)
            entry, verified = admit(db, store, envelope, body.cid)
            if entry is None:
                return pending_reply(verified, body.cid)
        except CommonsError as exc:
            raise http_error(exc) from None
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            raise HTTPException(400, f"malformed announcement ({type(exc).__name__}); send "
                                     '{"envelope": <model.sig>, "cid": <root CID>}') from None
        page = "dataset_page" if entry["kind"] == "dataset" else "adapter_page"
        url = str(request.url_for(page, name=entry["name"]))
        return {"cid": entry["cid"], "name": entry["name"], "version": entry["version"],
                "signer": entry["signer"], "url": url, "status": "listed"}

    @api.post("/presence", status_code=204, summary="A node says it is online (signed, fresh)")
    def presence(body: Presence) -> None:
        now = time.time()
        try:
            check_presence(body, now)
        except CommonsError as exc:
            raise http_error(exc) from None
        db.record_presence(body.node.lower(), now)

    return api
