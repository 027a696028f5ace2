"""One running peer: a host that seeds its BlockStore over bitswap (so Kubo and Helia can fetch from it
too), optionally with gossipsub announcements.

    >>> async with open_node(BlockStore(), identity, listen=["/ip4/0.0.0.0/tcp/4051"]) as node:
    ...     print(node.addrs)            # give these to pullers
    ...     await trio.sleep_forever()
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from libp2p.abc import IHost
from libp2p.exceptions import BaseLibp2pError

from protocol.errors import CommonsError
from protocol.p2p import host as hostlib
from protocol.p2p.bitswap import Bitswap, open_bitswap
from protocol.p2p.relay import Circuits, open_circuits
from protocol.p2p.resolve import serve_resolve
from protocol.p2p.topics import Gossip, make_pubsub, open_gossip
from protocol.p2p.wire import Pacer


@dataclass
class Node:
    host: IHost
    store: object
    gossip: Gossip | None
    bootstrap_errors: dict[str, str]
    bitswap: Bitswap | None = None  # serving already; fetch with bitswap.fetch_dag_async(node.bitswap, ...)
    dht: object | None = None  # a kad-dht server (protocol.p2p.dht) when open_node(..., dht=True)
    circuits: Circuits | None = None  # relaying for others, reservations at relays (protocol.p2p.relay)

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    @property
    def addrs(self) -> list[str]:
        return hostlib.host_addrs(self.host)

    @property
    def dialable_addrs(self) -> list[str]:
        """`addrs` with 0.0.0.0 expanded to this machine's interface addresses (what providers list)."""
        return hostlib.dialable(self.addrs)

    @property
    def circuit_addrs(self) -> list[str]:
        """Where peers reach us through a relay when we are behind a NAT (`open_node(..., relays=...)`)."""
        return list(self.circuits.addrs) if self.circuits is not None else []


@asynccontextmanager
async def open_node(
    store,
    identity=None,
    listen: Sequence[str] = (hostlib.LOCAL_LISTEN,),
    bootstrap: Sequence[str] = (),
    gossip: bool = False,
    rate_limit: float | None = None,
    mdns: bool = False,
    dht: bool = False,
    hop: bool = False,
    relays: Sequence[str] = (),
    hole_punch: bool = False,
) -> AsyncIterator[Node]:
    """Starts the host (identity's key, or a throwaway one), serves blocks, dials the bootstrap peers;
    with `dht`, also serves the IPFS DHT (protocol.p2p.dht) and puts the bootstrap peers in its table;
    with `hop`, relays for peers behind NATs; with `relays`, holds a reservation at each so that peers
    reach this one through them, and with `hole_punch` try to turn relayed connections direct (DCUtR)
    (protocol.p2p.relay)."""
    seed = hostlib.identity_seed(identity) if identity is not None else None
    host = hostlib.make_host(seed, mdns=mdns)
    kad = None
    if dht:  # before run, so that identify lists it
        from protocol.p2p import dht as dhtlib

        kad = dhtlib.make_dht(host)
    pacer = Pacer(rate_limit) if rate_limit else None  # bytes/s for every peer together
    pubsub_router = make_pubsub(host) if gossip else None
    async with AsyncExitStack() as stack:
        # bitswap before run, so that identify lists it
        swap = await stack.enter_async_context(open_bitswap(host, store, pacer))
        try:
            await stack.enter_async_context(host.run(listen_addrs=hostlib.listen_addrs(listen)))
        except (OSError, BaseLibp2pError) as exc:
            raise CommonsError(f"cannot listen on {list(listen)} ({exc}): pick another port") from None
        topics = None
        if pubsub_router is not None:
            topics = await stack.enter_async_context(open_gossip(*pubsub_router, identity))
        if topics is not None:  # answer "which CID is NAME?" from the announcements we verified
            serve_resolve(host, topics.lookup)
        if kad is not None:
            await stack.enter_async_context(dhtlib.running(kad))
        circuits = None
        if hop or relays:
            circuits = await stack.enter_async_context(open_circuits(host, hop, relays, hole_punch))
        node = await _started(host, store, topics, bootstrap, swap)
        node.circuits = circuits
        if kad is not None:
            node.dht = kad
            if circuits is not None:
                dhtlib.advertise_circuits(kad, host, circuits)
            await dhtlib.add_peers(kad, host)
        yield node


async def _started(host: IHost, store, topics: Gossip | None, bootstrap: Sequence[str],
                   swap: Bitswap) -> Node:
    errors: dict[str, str] = {}
    for addr in bootstrap:
        try:
            await hostlib.connect(host, addr)
        except CommonsError as exc:
            errors[addr] = str(exc)  # a dead bootstrap peer is not fatal; the caller reports it
    return Node(host, store, topics, errors, swap)
