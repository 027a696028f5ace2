"""The public index as one FastAPI app: pages, JSON API (/docs), and a trustless IPFS gateway.

    >>> app = create_app(IndexDB(), BlockStore())
    >>> uvicorn.run(app, port=8765)        # or: commons index serve

The gateway serves only what the block store holds and only as verifiable blocks (`?format=raw`) or
CARs (`?format=car`): clients re-hash everything, so the index never has to be trusted with content.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from index import api, pages
from index.db import IndexDB
from index.ratelimit import BodyLimit, TokenBucket, WriteRateLimit
from protocol.blockstore import BlockStore
from protocol.errors import CommonsError, VerifyError
from protocol.multiformats import CID

RAW = "application/vnd.ipld.raw"
CAR = "application/vnd.ipld.car"
STATIC = Path(__file__).parent / "static"


def directory_checker(store: BlockStore):
    """Refuse an announcement whose CID we hold and whose model.sig differs from the envelope sent."""

    def check(cid: str, envelope: bytes) -> None:
        from protocol import unixfs
        from protocol.manifest import SIGNATURE_FILE

        try:
            if not store.has(cid):
                return  # the index lists pointers; `commons pull` verifies the content it fetches
            listing = unixfs.list_directory(store.get, cid)
            sig_cid = next((c for path, c, _ in listing if path == SIGNATURE_FILE), None)
            held = b"".join(unixfs.iter_file(store.get, sig_cid)) if sig_cid else None
        except CommonsError:
            return  # partly held: nothing to compare against
        except Exception:  # noqa: BLE001 - a malformed CID is reported by register()
            return
        if held is None:
            raise VerifyError(f"the directory {cid} holds no {SIGNATURE_FILE}; sign it with `commons sign`")
        if held.strip() != envelope.strip():
            raise VerifyError(f"the {SIGNATURE_FILE} inside {cid} differs from the envelope sent; announce the "
                              "directory's own manifest")

    return check


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
                  description="Signed, content-addressed LoRA adapters and datasets. Pull with `commons pull NAME`.")
    app.state.db, app.state.store = db, store
    app.include_router(api.make_router(db, directory_checker(store)))
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
            raise HTTPException(400, "this is a trustless gateway: add ?format=raw (one block) or ?format=car")
        if not store.has(parsed):
            raise HTTPException(404, f"block {cid} is not held by this index; try another source")
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=29030400, immutable",
                   "Content-Disposition": f'attachment; filename="{parsed}.{"bin" if wanted == "raw" else "car"}"'}
        if wanted == "raw":
            try:
                block = store.get(parsed)
            except CommonsError as exc:
                raise HTTPException(404, str(exc)) from None
            return Response(block, media_type=RAW, headers=headers)
        try:
            car = _car_bytes(store, parsed)
        except CommonsError as exc:
            raise HTTPException(404, f"part of the DAG under {cid} is not held here ({exc}); try another source"
                                ) from None
        return Response(car, media_type=CAR, headers=headers)

    @app.exception_handler(RequestValidationError)
    def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_line(exc)}, status_code=422)

    app.add_middleware(WriteRateLimit, bucket=TokenBucket(write_rate, write_burst))
    app.add_middleware(BodyLimit, max_bytes=max_body)
    return app


def _car_bytes(store: BlockStore, root: str) -> bytes:
    """The whole DAG as a CAR, built before the response starts so a missing block is a clean 404."""
    import io

    from protocol.car import write_car

    buf = io.BytesIO()
    write_car(buf, [root], store.dag(root))
    return buf.getvalue()
