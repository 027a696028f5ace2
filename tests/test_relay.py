"""Circuit relay v2 in one process on loopback: a seeder reached only through a relay's circuit address
serves a DAG over bitswap; the failures name their fix. The NAT itself: test_multihost_netns.py."""

from __future__ import annotations

import os

import pytest
import trio

from protocol.content.blockstore import BlockStore
from protocol.errors import CommonsError
from protocol.p2p import relay as relaylib
from protocol.p2p.bitswap import fetch_dag_async
from protocol.p2p.node import open_node


def test_a_dag_travels_through_a_relay_circuit(tmp_path):
    payload = tmp_path / "adapter.bin"
    payload.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    seed_store = BlockStore(tmp_path / "seeder")
    root = seed_store.add_path(payload)

    async def main():
        async with open_node(BlockStore(tmp_path / "relay"), hop=True) as relay:
            relay_addr = relay.addrs[0]
            async with open_node(seed_store, relays=[relay_addr]) as seeder:
                circuit = relaylib.circuit_addr(relay_addr, seeder.peer_id)
                assert seeder.circuit_addrs == [circuit] and seeder.circuits.errors == {}
                async with open_node(BlockStore(tmp_path / "puller")) as puller:
                    report = await fetch_dag_async(puller.bitswap, root, puller.store, [circuit])
                    conns = puller.host.get_network().get_connections(seeder.host.get_id())
                    addrs = [str(a) for c in conns for a in c.get_transport_addresses()]
                    return report, addrs

    report, addrs = trio.run(main)
    assert report.root == root and report.peers_failed == {}
    assert addrs and all("/p2p-circuit" in a for a in addrs)  # relayed: no direct connection was made
    BlockStore(tmp_path / "puller").export(root, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == payload.read_bytes()


def test_a_peer_that_does_not_relay_is_refused_with_the_fix(tmp_path):
    async def main():
        async with open_node(BlockStore(tmp_path / "plain")) as plain:
            relay_addr = plain.addrs[0]
            async with (open_node(BlockStore(tmp_path / "seeder"), relays=[relay_addr]) as seeder,
                        open_node(BlockStore(tmp_path / "puller")) as puller):
                errors = dict(seeder.circuits.errors)
                assert seeder.circuit_addrs == []
                with pytest.raises(CommonsError) as dialled:
                    await relaylib.dial(puller.host, relaylib.circuit_addr(relay_addr, seeder.peer_id))
                return errors, str(dialled.value)

    errors, dialled = trio.run(main)
    (why,) = errors.values()
    assert "does not relay" in why and "serve --relay" in why
    assert "through its relay" in dialled and "--reserve" in dialled and "\n" not in dialled
