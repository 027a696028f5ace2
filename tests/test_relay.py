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
    import threading

    from processes import first_line

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    proc = subprocess.Popen([sys.executable, "-c", "from commons.cli import main; main()", "p2p", "serve",
                             "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", dead, "--reserve", dead],
                            env={**os.environ, "COMMONS_HOME": str(tmp_path)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wanted = [f"warning: bootstrap peer {dead} unreachable: ",
              f"warning: no reservation at relay {dead} (retrying): "]
    said: list[str] = []
    stop = threading.Timer(60, proc.terminate)  # a warning never said must not hang the read below
    stop.start()
    try:
        assert first_line(proc, "p2p serve", 60).startswith("peer id ")
        while wanted and (line := proc.stderr.readline()):  # what it says before it settles in to serve
            said.append(line)
            wanted = [w for w in wanted if not line.startswith(w)]
        assert proc.poll() is None  # still serving
    finally:
        stop.cancel()
        proc.terminate()
        proc.communicate(timeout=30)
    assert not wanted, said


def test_a_relay_that_comes_up_after_the_seeder_is_reserved_and_announced(tmp_path):
    """A seeder whose relay is down when it starts keeps retrying; once the relay is up it holds a circuit
    there, and its presence announcements (what the index's router hands pullers) carry that circuit."""
    import socket

    from protocol.p2p.announce import TOPIC_PRESENCE
    from protocol.p2p.background import Background
    from protocol.p2p.service import serve
    from protocol.signing.keys import Identity

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    relay_id = Identity.load_or_create(tmp_path / "relay.key").peer_id()
    relay_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{relay_id}"
    Identity.load_or_create(tmp_path / "seeder.key")
    seeder = Background(lambda ready: serve(BlockStore(tmp_path / "s"), (), ["/ip4/127.0.0.1/tcp/0"],
                                            tmp_path / "seeder.key", on_ready=ready, reserve=[relay_addr]),
                        name="seeder")
    info = seeder.start()
    relay = Background(lambda ready: serve(BlockStore(tmp_path / "r"), (), [f"/ip4/127.0.0.1/tcp/{port}"],
                                           tmp_path / "relay.key", on_ready=ready, relay=True), name="relay")
    circuit = relaylib.circuit_addr(relay_addr, info["peer_id"])
    try:
        assert info["circuit_addrs"] == [] and relay_addr in info["relay_errors"]

        async def watch() -> bool:
            async with open_node(BlockStore(tmp_path / "w"), gossip=True, bootstrap=info["addrs"]) as watcher:
                with trio.move_on_after(30):  # the relay is retried every 5 s; presence on each new peer
                    async for signed in watcher.gossip.messages(TOPIC_PRESENCE):
                        if signed.body.peer_id != info["peer_id"]:
                            continue
                        if circuit in signed.body.addrs:
                            return True
                        if not relay.alive:  # the watcher hears the seeder: now bring its relay up
                            await trio.to_thread.run_sync(relay.start)
            return False

        assert trio.run(watch)
    finally:
        seeder.stop()
        if relay.alive:
            relay.stop()


def test_a_seeder_behind_a_relay_is_found_on_the_dht_with_its_circuit(tmp_path):
    """What `node start --seed --reserve RELAY` runs: its provider records carry the circuit, so a node
    that finds it on the DHT reaches it through the relay (here by the circuit address alone)."""
    from protocol.p2p import dht
    from protocol.p2p.background import Background
    from protocol.p2p.service import serve
    from protocol.signing.keys import Identity

    (tmp_path / "adapter.bin").write_bytes(os.urandom(700_000))
    key = tmp_path / "seeder.key"
    Identity.load_or_create(key)

    async def main():
        async with open_node(BlockStore(tmp_path / "relay"), hop=True, dht=True) as relay:
            relay_addr = relay.addrs[0]
            seeder = Background(lambda ready: serve(BlockStore(tmp_path / "seed"), [tmp_path / "adapter.bin"],
                                                    ["/ip4/127.0.0.1/tcp/0"], key, [relay_addr],
                                                    reserve=[relay_addr], on_ready=ready))
            info = await trio.to_thread.run_sync(seeder.start)
            try:
                circuit = relaylib.circuit_addr(relay_addr, info["peer_id"])
                puller_store = BlockStore(tmp_path / "puller")
                async with open_node(puller_store, dht=True, bootstrap=[relay_addr]) as puller:
                    with trio.fail_after(30):
                        while not (found := await dht.find_providers(puller.dht, info["roots"][0])):
                            await trio.sleep(0.2)
                    (peer_id, addrs), = found
                    circuits = [a for a in addrs if "/p2p-circuit" in a]
                    report = await fetch_dag_async(puller.bitswap, info["roots"][0], puller.store, circuits)
                    return info, circuit, peer_id, addrs, report
            finally:
                await trio.to_thread.run_sync(seeder.stop)

    info, circuit, peer_id, addrs, report = trio.run(main)
    assert info["circuit_addrs"] == [circuit]
    assert peer_id == info["peer_id"] and circuit in addrs, addrs
    assert report.root == info["roots"][0] and report.peers_failed == {}
    BlockStore(tmp_path / "puller").export(report.root, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == (tmp_path / "adapter.bin").read_bytes()
