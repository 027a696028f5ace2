"""The long-running shells around the pure parts: seed a store forever; pull a DAG and export it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import trio

from protocol.p2p import dht
from protocol.p2p.announce import PresenceAnnouncement
from protocol.p2p.bitswap import fetch_dag
from protocol.p2p.node import open_node
from protocol.p2p.relay import CHECK_S
from protocol.p2p.topics import TOPICS
from protocol.signing.keys import Identity

PRESENCE_EVERY_S = 60
PROVIDE_S = 15


async def serve(
    store,
    add: Sequence[Path] = (),
    listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/4051",),
    key: Path | None = None,
    bootstrap: Sequence[str] = (),
    rate_limit: float | None = None,
    on_ready: Callable[[dict], None] | None = None,
    capability: str = "seed",
    mdns: bool = False,
    relay: bool = False,
    reserve: Sequence[str] = (),
    hole_punch: bool = False,
) -> None:
    """Adds `add` to the store, then seeds every block it holds until cancelled; announces presence, and
    provides the added roots on the IPFS DHT (protocol.p2p.dht). `relay`: also relay for peers behind NATs;
    `reserve`: behind a NAT, be reachable through these relays; `hole_punch`: and try DCUtR to go direct
    (protocol.p2p.relay)."""
    identity = Identity.load(key) if key else Identity.load_or_create()
    roots = [store.add_path(Path(path)) for path in add]
    async with open_node(store, identity, listen, bootstrap, gossip=True, rate_limit=rate_limit,
                         mdns=mdns, dht=True, hop=relay, relays=reserve,
                         hole_punch=hole_punch) as node:
        if on_ready is not None:
            on_ready({"peer_id": node.peer_id, "addrs": node.addrs, "roots": roots,
                      "bootstrap_errors": node.bootstrap_errors, "circuit_addrs": node.circuit_addrs,
                      "relay_errors": dict(node.circuits.errors) if node.circuits else {}})
        async with trio.open_nursery() as nursery:
            for topic in TOPICS:  # subscribing makes this node relay the topic and learn providers
                nursery.start_soon(_drain, node.gossip, topic)
            nursery.start_soon(provide_all, node, roots, bool(reserve))
            await announce_presence(node, capability)


async def provide_all(node, roots: Sequence[str], reserving: bool = False) -> None:
    """Each root on the DHT: our own record at once, then ADD_PROVIDER to the closest peers that answer.
    `reserving` (behind a NAT): again whenever our relay circuits change (a relay that was down at start,
    or restarted), so the records carry the addresses that reach us."""
    provided_with = None
    while True:
        if node.circuit_addrs != provided_with:
            provided_with = node.circuit_addrs
            for root in roots:
                with trio.move_on_after(PROVIDE_S):
                    await dht.provide(node.dht, root)
        if not roots or not reserving:
            return  # our addresses will not change
        await trio.sleep(CHECK_S)


async def _drain(gossip, topic: str) -> None:
    async for _signed in gossip.messages(topic):
        pass  # Gossip.messages already recorded providers; a seeder acts on nothing else


async def announce_presence(node, capability: str) -> None:
    """Presence when a new peer shows up (after its subscriptions arrive), and every minute, with the
    addresses that reach us then: behind a NAT only the circuits do, and a relay retried in the background
    may grant one after the start."""
    known: set = set()
    last = float("-inf")
    while True:
        peers = set(node.host.get_connected_peers())
        if peers and (peers - known or trio.current_time() - last > PRESENCE_EVERY_S):
            await trio.sleep(1)
            addrs = node.dialable_addrs + node.circuit_addrs
            await node.gossip.publish(PresenceAnnouncement(node.peer_id, capability, addrs))
            last = trio.current_time()
        known = peers
        await trio.sleep(2)


def pull(root: str, store, peers: Sequence[str], out: Path | None = None, progress: bool = True) -> dict:
    """Fetches the DAG (resuming from what `store` holds) over bitswap from `peers` (commons nodes, Kubo,
    Helia); exports it to `out` if given; a JSON-able report."""
    report = fetch_dag(root, store, peers, progress=progress)
    if out is not None:
        store.export(report.root, Path(out))
    return {**asdict(report), "mb_per_s": round(report.mb_per_s, 2), "out": str(out) if out else None}
