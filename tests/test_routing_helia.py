"""Helia finds our seeders the two ways an IPFS node looks for providers (tests/helia/peer.mjs):

    routed: knowing only the index URL, through its Delegated Routing V1 HTTP API, then fetches by CID
      commons node ──announce (gossip)──▶ commons index serve --p2p-listen ──bitswap fetch──▶ ingested
      Helia ──GET /routing/v1/providers/CID──▶ [the index's host, the seeder] ──bitswap──▶ files
    dht: kad-dht (client mode) bootstrapped from a `python -m protocol.p2p serve` seeder alone
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from helia_peer import Helia, first_line, same_tree, start_helia
from live_index import IndexProcess

from index.routing import peer_id_text
from index.sample import make_entry, sample_meta
from protocol.content.blockstore import BlockStore
from protocol.p2p.announce import TOPIC_ADAPTERS, AdapterAnnouncement
from protocol.p2p.announcer import wait_for_subscribers
from protocol.p2p.background import Background
from protocol.p2p.node import open_node
from protocol.signing.keys import Identity

SIZE = 1_600_000  # seven 256 KiB leaves


@pytest.fixture(scope="module")
def helia(tmp_path_factory) -> Helia:
    return start_helia(tmp_path_factory)


def _signed_adapter(folder: Path, who: Identity, store: BlockStore) -> tuple[bytes, str]:
    folder.mkdir()
    values = SIZE // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    header += b" " * (-len(header) % 8)
    weights = struct.pack("<Q", len(header)) + header + os.urandom(4 * values)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    return make_entry(folder, sample_meta("routed-lora"), who, store)


def _seeding(store: BlockStore, who: Identity, index: IndexProcess, cid: str, envelope: bytes) -> Background:
    """A commons node: seeds `store`, announces the adapter to the index, keeps seeding."""

    async def run(ready) -> None:
        async with open_node(store, who, ["/ip4/127.0.0.1/tcp/0"], [index.addr], gossip=True) as node:
            await wait_for_subscribers(node, TOPIC_ADAPTERS)
            await trio.sleep(2)  # two gossipsub heartbeats: the index is in our mesh
            await node.gossip.publish(AdapterAnnouncement(cid, "routed-lora", 1, envelope.decode(),
                                                          node.dialable_addrs))
            ready(node.peer_id)
            await trio.sleep_forever()

    return Background(run, name="seeder")


def test_helia_knowing_only_the_index_url_finds_the_seeder_and_fetches_by_cid(helia, tmp_path) -> None:
    index = IndexProcess(tmp_path / "index-home")
    who = Identity.generate()
    store = BlockStore(tmp_path / "seed")
    envelope, cid = _signed_adapter(tmp_path / "adapter", who, store)
    seeder = _seeding(store, who, index, cid, envelope)
    try:
        seeder_id = seeder.start()
        index.wait(lambda stats: stats["ingested"] >= 1, timeout=60)  # fetched from the seeder over bitswap
        listed = httpx.get(f"{index.url}/routing/v1/providers/{cid}", timeout=10).json()["Providers"]
        got = helia.run("routed", cid, index.url, str(tmp_path / "out"), cwd=tmp_path)
    finally:
        seeder.stop()
        index.stop()

    assert {(p["ID"], tuple(p["Protocols"])) for p in listed} >= {(seeder_id, ("transport-bitswap",)),
                                                                  (index.peer_id, ("transport-bitswap",))}
    found = {peer_id_text(text) for text in got["providers"]}  # Helia prints peer ids as CIDs
    assert {seeder_id, index.peer_id} <= found
    assert same_tree(tmp_path / "adapter", tmp_path / "out")


def test_helia_bootstrapped_from_our_seeder_finds_it_on_the_dht(helia, tmp_path) -> None:
    (tmp_path / "adapter.safetensors").write_bytes(os.urandom(300_000))
    command = [sys.executable, "-m", "protocol.p2p", "serve", "--store", str(tmp_path / "seed"), "--add",
               str(tmp_path / "adapter.safetensors"), "--listen", "/ip4/127.0.0.1/tcp/0"]
    seeder = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "COMMONS_HOME": str(tmp_path / "home")})
    try:
        info = json.loads(first_line(seeder, "python -m protocol.p2p serve"))
        got = helia.run("dht", info["roots"][0], info["addrs"][0], cwd=tmp_path)  # kad-dht, client mode
    finally:
        seeder.terminate()
        seeder.wait(10)

    assert [p["id"] for p in got["providers"]] == [info["peer_id"]]
    assert info["addrs"][0] in got["providers"][0]["addrs"]
