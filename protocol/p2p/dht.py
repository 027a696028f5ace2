"""The IPFS DHT (kad-dht, `/ipfs/kad/1.0.0`) on our host, py-libp2p's own: seeders provide the CIDs they
hold, so an IPFS node that reaches one of them (Kubo, Helia, another commons node) finds it as a provider.

    >>> async with open_node(store, identity, dht=True, bootstrap=[...]) as node:
    ...     await provide(node.dht, root)              # local record + ADD_PROVIDER to the closest peers
    ...     await find_providers(node.dht, root)       # [(peer id, [multiaddrs])], asked over the network

A seeder behind a NAT (protocol.p2p.relay) lists its relay circuits in its provider records beside its
own addresses, so whoever finds it on the DHT can reach it.

Server mode: we answer FIND_NODE, GET_PROVIDERS and ADD_PROVIDER (py-libp2p rate-limits ADD_PROVIDER per
peer). A record is a hint like any routing answer: blocks fetched from a provider are checked against
their CIDs. Without --bootstrap peers that speak kad, only the peers that dial us can ask.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from protocol.content.multiformats import CID


def make_dht(host: IHost) -> KadDHT:
    """Before `host.run`, so identify lists `/ipfs/kad/1.0.0` and peers add us to their tables."""
    return KadDHT(host, DHTMode.SERVER)


@asynccontextmanager
async def running(dht: KadDHT) -> AsyncIterator[KadDHT]:
    async with background_trio_service(dht):
        yield dht


async def add_peers(dht: KadDHT, host: IHost) -> int:
    """Every peer we are connected to that serves kad goes into the routing table; how many did."""
    added = 0
    for peer_id in host.get_connected_peers():
        added += bool(await dht.add_peer(peer_id))
    return added


class _WithCircuits:
    """The host as the provider store sees it: py-libp2p builds provider records from `get_addrs()`, whose
    /p2p suffix handling would cut a circuit address at the relay's id, so the circuits are added here."""

    def __init__(self, host: IHost, circuits) -> None:
        self._host, self._circuits = host, circuits

    def get_addrs(self) -> list[Multiaddr]:
        return self._host.get_addrs() + [Multiaddr(a) for a in self._circuits.addrs]

    def __getattr__(self, name: str):
        return getattr(self._host, name)


def advertise_circuits(dht: KadDHT, host: IHost, circuits) -> None:
    """From now on our provider records also carry `circuits.addrs` (protocol.p2p.relay.Circuits), as they
    are when each record is made."""
    dht.provider_store.host = _WithCircuits(host, circuits)


async def provide(dht: KadDHT, cid: str) -> bool:
    """Announce that we hold `cid` (keyed by its multihash, as every IPFS node keys it)."""
    return await dht.provide(str(CID.decode(cid)))


async def find_providers(dht: KadDHT, cid: str, count: int = 20) -> list[tuple[str, list[str]]]:
    found = await dht.find_providers(str(CID.decode(cid)), count)
    return [(info.peer_id.to_base58(), [str(a) for a in info.addrs]) for info in found]
