"""The index on the peer-to-peer network: ingest verified announcements, fetch their blocks, serve them.

    >>> p2p = IndexPeer(db, store, Identity.load_or_create(), ["/ip4/0.0.0.0/tcp/4051"], bootstrap=[])
    >>> p2p.start()                  # trio in its own thread; uvicorn keeps the asyncio loop
    >>> app.include_router(p2p_router(p2p.ingestor))      # GET /api/p2p: counts

For every adapter or dataset announcement that passed the gossip checks (signature, freshness, replay):

1. the DSSE envelope is verified (`verify_envelope` under the index's policy) and must name what the
   announcement names; a name owned by another signer, or a version already taken by another CID, is
   refused here, before any byte is fetched;
2. the DAG is fetched over bitswap from the announced providers (any IPFS node) into the index's
   BlockStore, every block re-hashed, stopped past what the envelope promises (a dataset's, unknown until
   fetched: past the policy's limit);
3. the fetched directory must carry that same `model.sig` and exactly the files it signs, each within its
   signed size (`protocol.content.fetch.fetch_signed` over the blocks now held);
4. `IndexDB.register` records it, and the index re-announces the CID with its own addresses: the
   publisher takes that as "replicated" and may stop seeding; it provides the CID on the IPFS DHT too.

Presence announcements update `IndexDB.record_presence`. Everything refused is counted by reason. What
was verified (who is live where, who provides which CID) goes to `routes`, which /routing/v1 answers from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import trio
from fastapi import APIRouter
from sqlalchemy import select

from index.db import IndexDB
from index.routing import Routes
from index.schema import documents
from protocol.content import dagpb
from protocol.content.fetch import NODE_OVERHEAD, fetch_signed
from protocol.content.unixfs import file_bounds, iter_file, upto
from protocol.errors import CommonsError
from protocol.p2p import dht
from protocol.p2p.announce import (
    AdapterAnnouncement,
    DatasetAnnouncement,
    PresenceAnnouncement,
    Signed,
)
from protocol.p2p.background import Background
from protocol.p2p.bitswap import fetch_dag_async
from protocol.p2p.exchange import unwrap
from protocol.p2p.node import Node, open_node
from protocol.p2p.resolve import serve_resolve
from protocol.p2p.service import PROVIDE_S, announce_presence
from protocol.p2p.topics import TOPICS
from protocol.signing.dsse import MAX_ENVELOPE_BYTES
from protocol.signing.manifest import SIGNATURE_FILE, Verified, verify_envelope

DONE = ("ingested", "presence", "known", "blocks")  # the counters that are not drops


class Refused(CommonsError):
    """An announcement the index will not act on; `reason` names the counter it goes to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_claim(verified: Verified, name: str, version: int | None, cid: str, versions: list[dict]) -> None:
    """The envelope must say what the announcement says, and must not squat or replay a name."""
    meta = verified.meta
    if meta.name != name or (version is not None and int(meta.version) != version):
        raise Refused("mismatch", f"announcement says {name} v{version} but its envelope signs "
                                  f"{meta.name} v{meta.version}")
    owners = {v["signer"] for v in versions}
    if owners and verified.signer not in owners:
        raise Refused("rejected", f"{name!r} belongs to another signer; announcement by "
                                  f"{verified.signer[:16]}… refused")
    taken = next((v["cid"] for v in versions if int(v["version"]) == int(meta.version)), None)
    if taken is not None and taken != cid:
        raise Refused("rejected",
                      f"{name} v{meta.version} is already {taken}; {cid} refused (replay or fork)")


def check_dag(store, cid: str, envelope: bytes, policy) -> None:
    """The fetched directory holds this very model.sig and exactly the files it signs,
    each within its size."""
    try:
        fetch_signed(cid, store, (), policy, envelope=envelope)
    except CommonsError as exc:
        raise Refused("mismatch", str(exc)) from None


class Budget:
    """`on_block` for the libp2p fetch: stops it past the blocks and bytes the manifest can take."""

    def __init__(self, cid: str, verified: Verified | None, max_file_size: int) -> None:
        files = verified.files if verified is not None else [{"name": "data", "size": max_file_size}]
        parts = [upto(MAX_ENVELOPE_BYTES), *(file_bounds(f["size"]) for f in files)]
        folders = {f["name"].rsplit("/", i)[0] for f in files for i in range(1, f["name"].count("/") + 1)}
        self.cid = cid
        self.blocks = sum(p.links for p in parts) + len(folders) + 1
        self.bytes = sum(p.bytes for p in parts) + self.blocks * NODE_OVERHEAD
        self.taken = [0, 0]

    def __call__(self, _block: str, size: int) -> None:
        self.taken[0] += 1
        self.taken[1] += size
        if self.taken[0] > self.blocks or self.taken[1] > self.bytes:
            raise Refused("mismatch",
                          f"{self.cid} takes more than the {self.blocks} blocks and {self.bytes} bytes "
                          "its manifest allows (a DAG bomb); refused")


def envelope_in_dag(store, cid: str) -> bytes:
    """A dataset announcement carries no envelope: the DAG's own model.sig is the one to verify."""
    try:
        links, _ = dagpb.decode_node(store.get(cid))
    except CommonsError:
        links = []
    sig = next((str(link.cid) for link in links if link.name == SIGNATURE_FILE), None)
    if sig is None:
        raise Refused("mismatch", f"{cid} holds no {SIGNATURE_FILE}; only signed datasets are indexed")
    return b"".join(iter_file(store.get, sig, upto(MAX_ENVELOPE_BYTES), SIGNATURE_FILE))


@dataclass
class Ingestor:
    """Acts on verified announcements for one index (db + store); counts what it did and refused."""

    db: IndexDB
    store: object
    counts: Counter = field(default_factory=Counter)
    log: list[dict] = field(default_factory=list)  # the latest outcomes, newest last
    node: Node | None = None
    routes: Routes = field(default_factory=Routes)  # for the delegated routing API (index/routing.py)

    def stats(self) -> dict:
        gossip = dict(self.node.gossip.dropped) if self.node and self.node.gossip else {}
        dropped = {**gossip, **{k: v for k, v in self.counts.items() if k not in DONE}}
        return {"peer_id": self.node.peer_id if self.node else None,
                "addrs": self.node.dialable_addrs if self.node else [],
                "peers": len(self.node.host.get_connected_peers()) if self.node else 0,
                "ingested": self.counts["ingested"], "known": self.counts["known"],
                "blocks_fetched": self.counts["blocks"], "presence": self.counts["presence"],
                "dropped": dropped, "recent": self.log[-20:]}

    def _note(self, outcome: str, signed: Signed, detail: str = "") -> None:
        self.counts[outcome] += 1
        self.log = [*self.log[-99:], {"outcome": outcome, "kind": signed.body.kind, "signer": signed.signer,
                                      "cid": getattr(signed.body, "cid", None), "detail": detail[:300]}]

    def lookup(self, name: str, version: int | None) -> tuple[str, str] | None:
        """Answers `/commons/resolve/1.0.0` from the database: (cid, envelope text) or None."""
        try:
            cid = self.db.resolve(name, version)["cid"]
        except CommonsError:
            return None
        with self.db.engine.connect() as conn:
            envelope = conn.execute(select(documents.c.envelope).where(documents.c.cid == cid)).scalar()
        return (cid, bytes(envelope).decode("utf-8")) if envelope is not None else None

    async def handle(self, node: Node, signed: Signed) -> None:
        body = signed.body
        try:
            if isinstance(body, PresenceAnnouncement):
                await trio.to_thread.run_sync(self.db.record_presence, signed.signer)
                self.routes.seen(a for a in body.addrs if a.endswith(f"/p2p/{body.peer_id}"))
                self._note("presence", signed)
            elif isinstance(body, (AdapterAnnouncement, DatasetAnnouncement)):
                await self._content(node, signed)
        except Refused as exc:
            self._note(exc.reason, signed, str(exc))
        except CommonsError as exc:
            self._note("rejected", signed, str(exc))
        except Exception as exc:  # noqa: BLE001 - one odd announcement must not stop the index's host
            self._note("error", signed, f"{type(exc).__name__}: {exc}")

    async def _content(self, node: Node, signed: Signed) -> None:
        body = signed.body
        is_adapter = isinstance(body, AdapterAnnouncement)
        cid = body.cid
        versions = await trio.to_thread.run_sync(self.db.versions, body.name)
        held = next((v for v in versions if v["cid"] == cid), None)
        if held is not None and not self.store.missing(cid):
            self._note("known", signed)
            self.routes.provides(cid, body.providers)
            if is_adapter and signed.signer == held["signer"]:
                # Its author announces it again (`commons p2p announce`): confirm we hold it. Only the
                # author gets an answer, so two indexes never answer each other's confirmations.
                await self._confirm(node, body.name, held["version"], body.envelope, cid)
            return
        verified = envelope = None
        if is_adapter:
            envelope = body.envelope.encode("utf-8")
            verified = await trio.to_thread.run_sync(verify_envelope, envelope, self.db.policy)
            check_claim(verified, body.name, body.version, cid, versions)
        if not body.providers:
            raise Refused("unfetchable", f"announcement of {cid} lists no providers")
        try:
            budget = Budget(cid, verified, self.db.policy.max_file_size)
            report = await fetch_dag_async(node.bitswap, cid, self.store, body.providers, progress=False,
                                           on_block=budget)
        except BaseExceptionGroup as group:
            raise Refused("unfetchable", f"fetching {cid}: {unwrap(group)}") from None
        except CommonsError as exc:
            raise Refused("unfetchable", f"fetching {cid}: {exc}") from None
        self.counts["blocks"] += report.blocks
        if envelope is None:
            envelope = envelope_in_dag(self.store, cid)
            verified = await trio.to_thread.run_sync(verify_envelope, envelope, self.db.policy)
            check_claim(verified, body.name, None, cid, versions)
        await trio.to_thread.run_sync(check_dag, self.store, cid, envelope, self.db.policy)
        await trio.to_thread.run_sync(self.db.register, envelope, cid)
        await trio.to_thread.run_sync(self.db.release, cid)  # an HTTP announcement of it waits no more
        self._note("ingested", signed, f"{body.name} v{verified.meta.version}")
        self.routes.provides(cid, body.providers)
        with trio.move_on_after(PROVIDE_S):  # our own DHT record at once; the closest peers if they answer
            await dht.provide(node.dht, cid)
        # We hold it now: say so, so the publisher may stop seeding and pullers find a second source.
        if is_adapter:
            await self._confirm(node, body.name, int(verified.meta.version), envelope.decode("utf-8"), cid)
        else:
            await node.gossip.publish(DatasetAnnouncement(cid, body.name, body.license, node.dialable_addrs))

    @staticmethod
    async def _confirm(node: Node, name: str, version: int, envelope: str, cid: str) -> None:
        await node.gossip.publish(AdapterAnnouncement(cid, name, int(version), envelope, node.dialable_addrs))


async def run_peer(ingestor: Ingestor, identity, listen, bootstrap, on_ready=None) -> None:
    """Host + gossip until cancelled: serves the store's blocks, ingests announcements, sends presence."""
    # hop: the index is the public node volunteers behind NATs reserve a relay slot at (docs/p2p.md)
    async with open_node(ingestor.store, identity, listen, bootstrap, gossip=True, dht=True,
                         hop=True) as node:
        ingestor.node = node
        ingestor.routes.me(node.dialable_addrs)
        serve_resolve(node.host, ingestor.lookup)  # names from the database, not only from announcements
        send, receive = trio.open_memory_channel(64)
        async with trio.open_nursery() as nursery:
            for topic in TOPICS:
                nursery.start_soon(_forward, node, topic, send.clone())
            nursery.start_soon(announce_presence, node, "index")
            if on_ready is not None:
                on_ready(node)
            async for signed in receive:  # one at a time: fetches are pipelined inside, the DB is serial
                await ingestor.handle(node, signed)


async def _forward(node: Node, topic: str, send) -> None:
    async with send:
        async for signed in node.gossip.messages(topic):
            await send.send(signed)


class IndexPeer:
    """`run_peer` on its own thread (trio there, asyncio in uvicorn's); start() returns once it listens."""

    def __init__(self, db: IndexDB, store, identity, listen, bootstrap=(), routes: Routes | None = None
                 ) -> None:
        self.ingestor = Ingestor(db, store, routes=routes if routes is not None else Routes())
        self._background = Background(
            lambda ready: run_peer(self.ingestor, identity, list(listen), list(bootstrap), on_ready=ready),
            name="index-p2p")

    def start(self) -> Node:
        return self._background.start()

    def stop(self) -> None:
        self._background.stop()


def p2p_router(ingestor: Ingestor) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["index"])

    @router.get("/p2p", summary="The index's libp2p host: peer id, addresses, announcements ingested/dropped")
    def p2p() -> dict:
        return ingestor.stats()

    return router
