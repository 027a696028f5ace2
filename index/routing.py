"""Delegated Routing V1 HTTP API (specs.ipfs.tech/routing/http-routing-v1): who provides a CID and where a
peer is, answered from what this index knows, so an IPFS client given only the index URL finds seeders.

    GET /routing/v1/providers/{cid}    {"Providers": [{"Schema": "peer", "ID": "12D3KooW...",
                                        "Addrs": ["/ip4/10.0.0.1/tcp/4051"],
                                        "Protocols": ["transport-bitswap"]}]}
    GET /routing/v1/peers/{peer-id}    {"Peers": [...the same records...]}

JSON, or one record per line (application/x-ndjson) when the Accept header asks for it; 404 when there is
none; IPIP-484's `filter-protocols` and `filter-addrs` are honoured. The providers of a CID, in order:

1. the index itself when its block store holds the block: over bitswap when it runs a libp2p host
   (`commons index serve --p2p-listen`), and over this very trustless gateway (`transport-ipfs-gateway-http`);
2. the peers named in signed announcements of that CID the index verified and acted on (it ingested the
   DAG, or already held it), while they are live: announced or present in the last LIVE_S seconds.

A record is a hint, never trusted: a client checks every block it then fetches against its CID. `Routes` is
written by the index's gossip thread (index/gossip.py) and read by the HTTP handlers, so it takes a lock.

    >>> routes = Routes()
    >>> routes.provides("Qm...", ["/ip4/10.0.0.1/tcp/4051/p2p/12D3KooW..."])    # a verified announcement
    >>> app.include_router(make_router(routes, store, peer_id="12D3KooW..."))
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from protocol.content.multiformats import CID, b32decode, b58decode, b58encode, varint_decode
from protocol.errors import CommonsError

BITSWAP = "transport-bitswap"
GATEWAY = "transport-ipfs-gateway-http"
NDJSON = "application/x-ndjson"
LIBP2P_KEY = 0x72
LIVE_S = 300  # as the index counts live nodes (index.db.LIVE_SECONDS)
MAX_PEERS = 10_000  # peers remembered: anyone can announce, so every table is bounded
MAX_CIDS = 100_000
PER_CID = 20  # providers kept per CID, the latest
CACHE_FOUND = "public, max-age=300"
CACHE_NONE = "public, max-age=15"


@dataclass(frozen=True)
class Record:
    """One peer schema record: what the routing API lists."""

    peer_id: str
    addrs: tuple[str, ...]
    protocols: tuple[str, ...]

    def to_json(self) -> dict:
        return {"Schema": "peer", "ID": self.peer_id, "Addrs": list(self.addrs),
                "Protocols": list(self.protocols)}


def split_p2p(addr: str) -> tuple[str, str] | None:
    """(/ip4/.../tcp/PORT, peer id) of a full multiaddr ending in /p2p/ID; None for anything else."""
    head, sep, peer_id = addr.rpartition("/p2p/")
    if not sep or not head.startswith("/") or "/" in peer_id or not peer_id:
        return None
    return head, peer_id


def peer_id_text(value: str) -> str:
    """A peer id as base58 (12D3KooW..., Qm...), from itself or a CIDv1 libp2p-key (bafz..., k51...).

    Raises CommonsError for anything else (not base58, base32 or base36; not a libp2p-key CID)."""
    if value[:1] in ("1", "Q"):
        multihash = b58decode(value)
    elif value[:1] in ("b", "k"):
        raw = b32decode(value[1:]) if value[0] == "b" else _b36decode(value[1:])
        version, at = varint_decode(raw)
        codec, at = varint_decode(raw, at)
        if version != 1 or codec != LIBP2P_KEY:
            raise CommonsError(f"{value[:80]!r} is a CID but not a libp2p-key (a peer id)")
        multihash = raw[at:]
    else:
        raise CommonsError(f"{value[:80]!r} is not a peer id: pass 12D3KooW... or a libp2p-key CID")
    _, at = varint_decode(multihash)
    length, at = varint_decode(multihash, at)
    if length != len(multihash) - at or length == 0:
        raise CommonsError(f"{value[:80]!r} is not a peer id: its multihash is truncated")
    return b58encode(multihash)


def _b36decode(text: str) -> bytes:
    try:
        number = int(text, 36)
    except ValueError:
        raise CommonsError(f"invalid base36 in {text[:80]!r}") from None
    return number.to_bytes((number.bit_length() + 7) // 8, "big")


class Routes:
    """Peers and the CIDs they provide, from verified announcements and presence; the index's own host."""

    def __init__(self, live_s: float = LIVE_S, max_peers: int = MAX_PEERS, max_cids: int = MAX_CIDS) -> None:
        self.live_s = live_s
        self.max_peers = max_peers
        self.max_cids = max_cids
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()  # id -> (seen, addrs)
        self._cids: OrderedDict[bytes, OrderedDict[str, None]] = OrderedDict()  # digest -> peer ids
        self.own: Record | None = None  # the index's libp2p host, once it listens

    def me(self, addrs: Sequence[str]) -> None:
        """The index's own host (full multiaddrs, as `Node.dialable_addrs`)."""
        split = [s for s in map(split_p2p, addrs) if s is not None]
        if split:
            self.own = Record(split[0][1], tuple(head for head, _ in split), (BITSWAP,))

    def seen(self, addrs: Iterable[str], now: float | None = None) -> list[str]:
        """Peers at these full multiaddrs are live now (a presence, an announcement); their ids."""
        now = time.time() if now is None else now
        grouped: dict[str, list[str]] = {}
        for split in filter(None, map(split_p2p, addrs)):
            grouped.setdefault(split[1], []).append(split[0])
        with self._lock:
            for peer_id, heads in grouped.items():
                self._peers[peer_id] = (now, tuple(dict.fromkeys(heads)))
                self._peers.move_to_end(peer_id)
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
        return list(grouped)

    def provides(self, cid: str, addrs: Iterable[str], now: float | None = None) -> None:
        """The peers at `addrs` hold `cid` (its signed announcement was verified and acted on)."""
        key = CID.decode(cid).digest
        peer_ids = self.seen(addrs, now)
        with self._lock:
            held = self._cids.setdefault(key, OrderedDict())
            self._cids.move_to_end(key)
            for peer_id in peer_ids:
                held[peer_id] = None
                held.move_to_end(peer_id)
            while len(held) > PER_CID:
                held.popitem(last=False)
            while len(self._cids) > self.max_cids:
                self._cids.popitem(last=False)

    def providers(self, cid: CID, now: float | None = None) -> list[Record]:
        """The live peers that announced `cid` (any CID version: matched by its hash), latest first."""
        now = time.time() if now is None else now
        with self._lock:
            peer_ids = list(self._cids.get(cid.digest, ()))
        found = (self.peer(peer_id, now) for peer_id in reversed(peer_ids))
        return [record for record in found if record is not None]

    def peer(self, peer_id: str, now: float | None = None) -> Record | None:
        """Where `peer_id` listens, if it was live lately (or is the index itself)."""
        if self.own is not None and self.own.peer_id == peer_id:
            return self.own
        now = time.time() if now is None else now
        with self._lock:
            seen, addrs = self._peers.get(peer_id, (0.0, ()))
        return Record(peer_id, addrs, (BITSWAP,)) if addrs and now - seen <= self.live_s else None


def gateway_addr(base_url: str) -> str:
    """This index's URL as a multiaddr: http://10.0.0.1:8000/ -> /ip4/10.0.0.1/tcp/8000/http."""
    url = urlsplit(base_url)
    host = url.hostname or "127.0.0.1"
    port = url.port or (443 if url.scheme == "https" else 80)
    kind = "ip6" if ":" in host else "ip4" if host.replace(".", "").isdigit() else "dns"
    return f"/{kind}/{host}/tcp/{port}/{'https' if url.scheme == 'https' else 'http'}"


def _filtered(records: list[Record], request: Request) -> list[Record]:
    """IPIP-484: `filter-protocols` keeps records speaking one of them ("unknown": those naming none);
    `filter-addrs` keeps the addresses holding one of the named parts ("!name" drops them)."""
    protocols = [p for p in request.query_params.get("filter-protocols", "").split(",") if p]
    parts = [p for p in request.query_params.get("filter-addrs", "").split(",") if p]
    out = []
    for record in records:
        if protocols and not (set(protocols) & set(record.protocols or ("unknown",))):
            continue
        addrs = tuple(a for a in record.addrs if _addr_passes(a, parts)) if parts else record.addrs
        if addrs or (not record.addrs and "unknown" in parts):
            out.append(Record(record.peer_id, addrs, record.protocols))
    return out


def _addr_passes(addr: str, parts: list[str]) -> bool:
    names = set(addr.strip("/").split("/"))
    if any(p.startswith("!") and p[1:] in names for p in parts):
        return False
    wanted = [p for p in parts if not p.startswith("!") and p != "unknown"]
    return not wanted or any(p in names for p in wanted)


def _answer(request: Request, key: str, records: list[Record]) -> Response:
    records = _filtered(records, request)
    if not records:
        return JSONResponse({key: []}, status_code=404, headers={"Cache-Control": CACHE_NONE})
    headers = {"Cache-Control": CACHE_FOUND, "Vary": "Accept"}
    if NDJSON in request.headers.get("accept", ""):
        lines = "".join(json.dumps(r.to_json(), separators=(",", ":")) + "\n" for r in records)
        return Response(lines, media_type=NDJSON, headers=headers)
    return JSONResponse({key: [r.to_json() for r in records]}, headers=headers)


def make_router(routes: Routes | None, store, peer_id: str | None = None) -> APIRouter:
    """The two GET routes; `peer_id` names this index's gateway record (its identity's peer id)."""
    router = APIRouter(prefix="/routing/v1", tags=["routing"])
    routes = routes if routes is not None else Routes()

    def own(cid: str, request: Request) -> list[Record]:
        if not store.has(cid):
            return []
        records = [routes.own] if routes.own is not None else []
        gateway_id = routes.own.peer_id if routes.own is not None else peer_id
        if gateway_id is not None:
            records.append(Record(gateway_id, (gateway_addr(str(request.base_url)),), (GATEWAY,)))
        return records

    @router.get("/providers/{cid}", summary="Who provides CID: this index, and the seeders it verified")
    def providers(cid: str, request: Request) -> Response:
        try:
            parsed = CID.decode(cid)
        except Exception:  # noqa: BLE001 - every decoding failure means the same thing to the client
            raise HTTPException(400, f"{cid[:80]!r} is not a CID; pass a Qm... or b... CID") from None
        records = own(str(parsed), request)
        ours = {r.peer_id for r in records}
        records += [r for r in routes.providers(parsed) if r.peer_id not in ours]
        return _answer(request, "Providers", records)

    @router.get("/peers/{peer_id}", summary="Where a peer listens: this index's host or a live seeder")
    def peers(peer_id: str, request: Request) -> Response:
        try:
            wanted = peer_id_text(peer_id)
        except (CommonsError, ValueError) as exc:
            raise HTTPException(400, str(exc)) from None
        record = routes.peer(wanted)
        return _answer(request, "Peers", [record] if record is not None else [])

    return router
