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


def test_serve_names_the_peers_it_could_not_reach_and_keeps_serving(tmp_path):
    """`commons p2p serve` with a dead bootstrap peer and a dead relay starts anyway and says each on one
    line (the relay is retried in the background)."""
    import socket
    import subprocess
    import sys

    from processes import first_line

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    proc = subprocess.Popen([sys.executable, "-c", "from commons.cli import main; main()", "p2p", "serve",
                             "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", dead, "--reserve", dead],
                            env={**os.environ, "COMMONS_HOME": str(tmp_path)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert first_line(proc, "p2p serve", 60).startswith("peer id ") and proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    said = err.splitlines()
    assert any(line.startswith(f"warning: bootstrap peer {dead} unreachable: ") for line in said), err
    assert any(line.startswith(f"warning: no reservation at relay {dead} (retrying): ") for line in said), err
