"""The public index as one FastAPI app: pages, JSON API (/docs), a trustless IPFS gateway and delegated
routing (/routing/v1, index/routing.py).

    >>> app = create_app(IndexDB(), BlockStore())
    >>> uvicorn.run(app, port=8765)        # or: commons index serve

The gateway serves only what the block store holds and only as verifiable blocks (`?format=raw`) or
CARs (`?format=car`): clients re-hash everything, so the index never has to be trusted with content.
CARs follow the trustless gateway spec: version 1, depth-first in link order, each block once
(`application/vnd.ipld.car; version=1; order=dfs; dups=n`), the whole DAG unless `dag-scope=entity`
(a folder's own block) or `dag-scope=block` (the root block) asks for less; other variants get 406.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from index import api, pages, routing
from index.db import IndexDB
from index.ratelimit import BodyLimit, TokenBucket, WriteRateLimit
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID, DAG_PB
from protocol.errors import CommonsError

RAW = "application/vnd.ipld.raw"
CAR = "application/vnd.ipld.car"
CAR_TYPE = f"{CAR}; version=1; order=dfs; dups=n"  # what _car_stream writes
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


def car_scope(request: Request) -> str:
    """The dag-scope asked for (all, entity, block); HTTPException for a CAR variant we do not write."""
    asked = {"version": "1", "order": "dfs", "dups": "n"}
    for part in request.headers.get("accept", "").split(","):
        media, *params = [p.strip() for p in part.split(";")]
        if media == CAR:
            asked.update(p.split("=", 1) for p in params if "=" in p and not p.startswith("q="))
            break
    asked.update({k: request.query_params[f"car-{k}"] for k in ("version", "order", "dups")
                  if f"car-{k}" in request.query_params})
    if asked["version"] != "1" or asked["order"] not in ("dfs", "unk") or asked["dups"] != "n":
        raise HTTPException(406, f"this gateway writes only {CAR_TYPE}; ask for that variant")
    if "entity-bytes" in request.query_params:
        raise HTTPException(400, "entity-bytes is not supported here; fetch the whole file (dag-scope=all)")
    scope = request.query_params.get("dag-scope", "all")
    if scope not in ("all", "entity", "block"):
        raise HTTPException(400, f"dag-scope={scope[:20]!r} is not one of all, entity, block")
    return scope


def create_app(db: IndexDB, store: BlockStore, *, write_rate: float = 1.0, write_burst: int = 30,
               max_body: int = 1 << 20, routes: routing.Routes | None = None, peer_id: str | None = None
               ) -> FastAPI:
    """`routes`: what the index's libp2p side learnt (index/gossip.py); `peer_id`: the index's own, for the
    gateway's routing record."""
    app = FastAPI(title="LoRA Commons index", version="1",
                  description="Signed, content-addressed LoRA adapters and datasets. Pull with `commons pull "
                              "NAME`.")
    app.state.db, app.state.store = db, store
    app.include_router(api.make_router(db, store))
    app.include_router(pages.make_router(db))
    app.include_router(routing.make_router(routes, store, peer_id))
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
            return Response(block, media_type=RAW, headers={**headers, "Etag": f'"{parsed}.raw"'})
        scope = car_scope(request)
        try:
            missing = store.missing(parsed) if scope != "block" else []
        except CommonsError as exc:
            missing = [str(exc)]
        if missing:
            raise HTTPException(404,
                                f"part of the DAG under {cid} is not held here ({missing[0]}); try another "
                                "source")
        headers["Etag"] = f'"{parsed}.car.{scope}.dfs.n"'
        return StreamingResponse(_car_stream(store, parsed, scope), headers=headers,
                                 media_type=CAR_TYPE)

    @app.exception_handler(RequestValidationError)
    def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_line(exc)}, status_code=422)

    app.add_middleware(WriteRateLimit, bucket=TokenBucket(write_rate, write_burst))
    app.add_middleware(BodyLimit, max_bytes=max_body)
    return app


def _car_stream(store: BlockStore, root: str, scope: str = "all") -> Iterator[bytes]:
    """The DAG as a CAR (protocol.content.car's framing), block by block: a request for a 2 GiB adapter
    holds one block in memory, not 2 GiB. Completeness is checked before the response starts (a clean 404).
    `store.dag` walks depth-first in link order, each block once: order=dfs, dups=n."""
    from protocol.content.car import encode_header
    from protocol.content.multiformats import varint_encode

    header = encode_header([root])
    yield varint_encode(len(header)) + header
    if scope == "block" or (scope == "entity" and _is_folder(store, root)):
        blocks: Iterable[tuple[str, bytes]] = [(root, store.get(root))]
    else:
        blocks = store.dag(root)
    for cid, block in blocks:
        raw = CID.decode(cid).to_bytes()
        yield varint_encode(len(raw) + len(block)) + raw + block


def _is_folder(store: BlockStore, cid: str) -> bool:
    """A UnixFS directory, whose entity is its own block (a file's is every block of it)."""
    from protocol.content import dagpb, unixfs

    if CID.decode(cid).codec != DAG_PB:
        return False
    try:
        return unixfs.decode_unixfs(dagpb.decode_node(store.get(cid))[1]).type == unixfs.T_DIRECTORY
    except CommonsError:
        return False
