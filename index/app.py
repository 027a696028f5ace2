"""The public index as one FastAPI app: pages, JSON API (/docs), and a trustless IPFS gateway.

    >>> app = create_app(IndexDB(), BlockStore())
    >>> uvicorn.run(app, port=8765)        # or: commons index serve

The gateway serves only what the block store holds and only as verifiable blocks (`?format=raw`) or
CARs (`?format=car`): clients re-hash everything, so the index never has to be trusted with content.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from index import api, pages
from index.db import IndexDB
from index.ratelimit import BodyLimit, TokenBucket, WriteRateLimit
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID
from protocol.errors import CommonsError

RAW = "application/vnd.ipld.raw"
CAR = "application/vnd.ipld.car"
STATIC = Path(__file__).parent / "static"


def validation_line(exc: RequestValidationError) -> str:
    """FastAPI's list of problems as the one line our clients print."""
    errors = exc.errors()
    if not errors:
        return "malformed request; see /docs for the expected shape"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}; see /docs for the expected shape"


def _gateway_wants(request: Request, fmt: str | None) -> str | None:
    if fmt in ("raw", "car"):
        return fmt
    accept = request.headers.get("accept", "")
    return "raw" if RAW in accept else "car" if CAR in accept else None


def create_app(db: IndexDB, store: BlockStore, *, write_rate: float = 1.0, write_burst: int = 30,
               max_body: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="LoRA Commons index", version="1",
                  description="Signed, content-addressed LoRA adapters and datasets. Pull with `commons pull "
                              "NAME`.")
    app.state.db, app.state.store = db, store
    app.include_router(api.make_router(db, store))
    app.include_router(pages.make_router(db))
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/ipfs/{cid}", tags=["gateway"], summary="Trustless gateway: a raw block or a CAR of the DAG",
             responses={200: {"content": {RAW: {}, CAR: {}}}})
    def gateway(cid: str, request: Request, format: str | None = None) -> Response:
        try:
            parsed = str(CID.decode(cid))
        except Exception:  # noqa: BLE001 - every decoding failure means the same thing to the client
            raise HTTPException(400, f"{cid[:80]!r} is not a valid CID; pass a Qm... or b... CID") from None
        wanted = _gateway_wants(request, format)
        if wanted is None:
            raise HTTPException(400,
                                "this is a trustless gateway: add ?format=raw (one block) or ?format=car")
        if not store.has(parsed):
            raise HTTPException(404, f"block {cid} is not held by this index; try another source")
        headers = {"X-Content-Type-Options": "nosniff",
                   "Cache-Control": "public, max-age=29030400, immutable",
                   "Content-Disposition": 'attachment; '
                                          f'filename="{parsed}.{"bin" if wanted == "raw" else "car"}"'}
        if wanted == "raw":
            try:
                block = store.get(parsed)
            except CommonsError as exc:
                raise HTTPException(404, str(exc)) from None
            return Response(block, media_type=RAW, headers=headers)
        try:
            missing = store.missing(parsed)
        except CommonsError as exc:
            missing = [str(exc)]
        if missing:
            raise HTTPException(404,
                                f"part of the DAG under {cid} is not held here ({missing[0]}); try another "
                                "source")
        return StreamingResponse(_car_stream(store, parsed), media_type=CAR, headers=headers)

    @app.exception_handler(RequestValidationError)
    def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_line(exc)}, status_code=422)

    app.add_middleware(WriteRateLimit, bucket=TokenBucket(write_rate, write_burst))
    app.add_middleware(BodyLimit, max_bytes=max_body)
    return app


def _car_stream(store: BlockStore, root: str) -> Iterator[bytes]:
    """The whole DAG as a CAR (protocol.content.car's framing), block by block: a request for a 2 GiB adapter
    holds one block in memory, not 2 GiB. Completeness is checked before the response starts (a clean 404)."""
    from protocol.content.car import encode_header
    from protocol.content.multiformats import varint_encode

    header = encode_header([root])
    yield varint_encode(len(header)) + header
    for cid, block in store.dag(root):
        raw = CID.decode(cid).to_bytes()
        yield varint_encode(len(raw) + len(block)) + raw + block
