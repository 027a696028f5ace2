"""The IPFS DHT (kad-dht, `/ipfs/kad/1.0.0`, protocol.p2p.dht) between our own nodes on loopback: a seeder
provides what it adds; a node that knows only the seeder's address finds it as the provider of a CID and
pulls the DAG from what it found. Helia finding our seeder the same way is in test_routing_helia.py."""

from __future__ import annotations

import os

import trio

from protocol.content.blockstore import BlockStore
from protocol.p2p import bitswap, dht
from protocol.p2p.background import Background
from protocol.p2p.node import open_node
from protocol.p2p.service import serve
from protocol.signing.keys import Identity


def test_a_node_bootstrapped_from_a_seeder_finds_it_on_the_dht_and_pulls(tmp_path) -> None:
    (tmp_path / "adapter.safetensors").write_bytes(os.urandom(600_000))
    key = tmp_path / "seeder.key"
    Identity.load_or_create(key)
    seeder = Background(lambda ready: serve(BlockStore(tmp_path / "seed"), [tmp_path / "adapter.safetensors"],
                                            ["/ip4/127.0.0.1/tcp/0"], key, on_ready=ready))
    info = seeder.start()
    root = info["roots"][0]

    async def look_up() -> list[tuple[str, list[str]]]:
        async with open_node(BlockStore(tmp_path / "b"), dht=True, bootstrap=info["addrs"]) as node:
            with trio.fail_after(30):
                return await dht.find_providers(node.dht, root)

    try:
        found = trio.run(look_up)
        peer_id, addrs = found[0]
        report = bitswap.fetch_dag(root, BlockStore(tmp_path / "pulled"), addrs, progress=False)
    finally:
        seeder.stop()

    assert peer_id == info["peer_id"] and addrs
    assert report.blocks == 4  # three 256 KiB leaves and their file node
    BlockStore(tmp_path / "pulled").export(root, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "adapter.safetensors").read_bytes()


def test_a_provider_record_travels_through_a_third_node(tmp_path) -> None:
    (tmp_path / "adapter.safetensors").write_bytes(os.urandom(300_000))
    key = tmp_path / "seeder.key"
    Identity.load_or_create(key)

    async def main() -> tuple[str, list]:
        async with open_node(BlockStore(tmp_path / "a"), dht=True) as hub:  # knows nothing of the CID
            files = [tmp_path / "adapter.safetensors"]
            seeder = Background(lambda ready: serve(BlockStore(tmp_path / "seed"), files,
                                                    ["/ip4/127.0.0.1/tcp/0"], key, hub.addrs, on_ready=ready))
            info = await trio.to_thread.run_sync(seeder.start)
            try:
                with trio.fail_after(30):  # the seeder's ADD_PROVIDER reaches the hub
                    while not hub.dht.provider_store.get_providers(_key(info["roots"][0])):
                        await trio.sleep(0.1)
                seeder_id = info["peer_id"]
            finally:
                await trio.to_thread.run_sync(seeder.stop)
            # the seeder is gone: the record the hub holds is all a newcomer can learn from
            async with open_node(BlockStore(tmp_path / "c"), dht=True, bootstrap=hub.addrs) as newcomer:
                with trio.fail_after(30):
                    return seeder_id, await dht.find_providers(newcomer.dht, info["roots"][0])

    seeder_id, found = trio.run(main)
    assert [peer_id for peer_id, _ in found] == [seeder_id]


def _key(cid: str) -> bytes:
    from protocol.content.multiformats import CID

    return CID.decode(cid).multihash()
