"""The index's trustless gateway and delegated routing against @helia/verified-fetch (tests/helia/peer.mjs
`car`, see tests/helia_peer.py).

verified-fetch runs over HTTP only, knowing nothing but the index URL as its delegated router: it asks
/routing/v1/providers/CID, finds the index's gateway record, fetches every block with ?format=raw,
checks each against its CID and builds the CAR `?format=car` asks for (dag-scope=all, order=dfs,
dups=n). That CAR must hold exactly the published folder, and be byte for byte the index's own CAR.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import pytest
from helia_peer import Helia, same_tree, start_helia
from live_index import serve_index

from index.sample import make_entry, sample_meta
from protocol.content.blockstore import BlockStore
from protocol.content.car import read_car
from protocol.signing.keys import Identity


@pytest.fixture(scope="module")
def helia(tmp_path_factory) -> Helia:
    return start_helia(tmp_path_factory)


def test_verified_fetch_builds_the_indexs_own_car_from_its_gateway(helia, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (folder / "README.md").write_text(os.urandom(700_000).hex())  # 1.4 MB: a file over six leaves
    with serve_index(tmp_path / "index", peer_id=Identity.generate().peer_id()) as index:
        _, cid = make_entry(folder, sample_meta("car-lora"), Identity.generate(), index.store)
        got = helia.run("car", index.url, cid, str(tmp_path / "helia.car"), cwd=tmp_path)
        ours = httpx.get(f"{index.url}/ipfs/{cid}?format=car", timeout=30)

    roots, blocks = read_car(io.BytesIO((tmp_path / "helia.car").read_bytes()))
    copy = BlockStore(tmp_path / "copy")
    for block_cid, block in blocks:
        copy.put(block_cid, block)  # re-hashed: a block that is not its CID's is refused
    copy.export(cid, tmp_path / "out")

    assert got["status"] == 200 and got["type"] == "application/vnd.ipld.car; version=1; order=dfs; dups=n"
    assert roots == [cid] and same_tree(folder, tmp_path / "out")
    assert ours.headers["content-type"] == got["type"]
    assert (tmp_path / "helia.car").read_bytes() == ours.content
