"""Bitswap against the real JS implementation: a Helia node (tests/helia/peer.mjs, see tests/helia_peer.py)
and ours, both ways.

    (a) Helia fetches by CID what `python -m protocol.p2p serve` seeds: every file byte for byte
    (b) we fetch what Helia added: with Kubo's layout under our own CIDs (v0, and v1 raw leaves),
        and with Helia's own defaults (1 MiB raw leaves, 1024 links) under whatever CID it gives
    (c) `commons pull` takes a signed adapter folder that Helia added and seeds, with Helia as its only
        peer: the files it lays out are the ones signed, byte for byte
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helia_peer import Helia, first_line, same_tree, start_helia

from protocol.content import fetch
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import RAW, cid_for
from protocol.p2p import bitswap

ROOT = Path(__file__).resolve().parents[1]
SIZE = 2_700_000  # 11 leaves of 256 KiB (Kubo) or 3 of 1 MiB (Helia): a file node over several blocks


@pytest.fixture(scope="module")
def helia(tmp_path_factory) -> Helia:
    return start_helia(tmp_path_factory)


@pytest.fixture
def tree(tmp_path) -> Path:
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.bin").write_bytes(os.urandom(SIZE))
    (folder / "sub" / "config.json").write_text('{"r": 8, "alpha": 16}\n')
    (folder / "README.md").write_text("a small file: one block\n")
    return folder


@contextmanager
def _seeding(folder: Path, tmp_path: Path) -> Iterator[dict]:
    """`python -m protocol.p2p serve` (what `commons p2p serve` runs) seeding `folder`."""
    cmd = [sys.executable, "-m", "protocol.p2p", "serve", "--store", str(tmp_path / "seed"),
           "--add", str(folder), "--listen", "/ip4/127.0.0.1/tcp/0"]
    env = {**os.environ, "COMMONS_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        yield json.loads(first_line(proc, "commons serve"))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---------------------------------------------------------------- (a) Helia fetches from us


def test_helia_fetches_a_folder_we_seed_byte_for_byte(helia, tree, tmp_path) -> None:
    with _seeding(tree, tmp_path) as seeder:
        got = helia.run("fetch", seeder["roots"][0], seeder["addrs"][0], str(tmp_path / "out"), cwd=tmp_path)

    assert seeder["roots"][0] == BlockStore(tmp_path / "ref").add_path(tree)  # our (Kubo's) CIDv0
    assert got["files"] == 3 and got["bytes"] == sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    assert same_tree(tree, tmp_path / "out")


# ---------------------------------------------------------------- (b) we fetch from Helia


@pytest.mark.parametrize(("layout", "cid_version"), [("kubo", 0), ("kubo-v1", 1)])
def test_what_helia_adds_with_kubos_layout_has_our_cid_and_comes_whole(helia, tree, tmp_path, layout,
                                                                      cid_version) -> None:
    store = BlockStore(tmp_path / "pulled")
    with helia.adding(tree, layout, cwd=tmp_path) as added, bitswap.BitswapSource(added["addrs"]) as source:
        fetched = fetch.fetch_dag(added["cid"], store, [source], progress=False)  # as `commons pull` fetches
        unknown = source.get_block(str(cid_for(RAW, b"helia does not have this")))
    store.export(added["cid"], tmp_path / "out")

    assert added["cid"] == BlockStore(tmp_path / "ref").add_path(tree, cid_version=cid_version)
    assert fetched == len(list(store.dag(added["cid"])))
    assert unknown is None  # Helia's dont-have, not a timeout
    assert same_tree(tree, tmp_path / "out")


def test_what_helia_adds_with_its_own_defaults_comes_whole_under_its_cid(helia, tree, tmp_path) -> None:
    store = BlockStore(tmp_path / "pulled")
    with helia.adding(tree, "helia", cwd=tmp_path) as added:
        report = bitswap.fetch_dag(added["cid"], store, added["addrs"], progress=False)
    store.export(added["cid"], tmp_path / "out")

    # 1 MiB raw leaves and 1024 links per node: the same bytes under a CID `ipfs add` would not give
    assert added["cid"].startswith("bafy") and added["cid"] != BlockStore(tmp_path / "ref").add_path(tree, 1)
    assert max(len(block) for _, block in store.dag(added["cid"])) == 1 << 20
    assert report.blocks == len(list(store.dag(added["cid"])))
    assert same_tree(tree, tmp_path / "out")


# ---------------------------------------------------------------- (c) `commons pull` from Helia


def test_commons_pull_takes_a_signed_folder_helia_added_and_seeds(helia, tmp_path, monkeypatch) -> None:
    from commons.pull import pull
    from index.sample import make_entry, sample_meta
    from protocol.signing.keys import Identity

    folder = tmp_path / "signed"
    folder.mkdir()
    values = SIZE // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    header += b" " * (-len(header) % 8)
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                                       + os.urandom(4 * values))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    _, cid = make_entry(folder, sample_meta("helia-seeded"), Identity.generate())
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("COMMONS_HOME", str(home))

    with helia.adding(folder, "kubo", cwd=tmp_path) as added:
        (home / "config.toml").write_text(f"peers = {json.dumps(added['addrs'])}\n")
        pulled = pull(cid, out=tmp_path / "pulled", index_url="http://127.0.0.1:9", progress=False)

    assert added["cid"] == cid  # Helia's `ipfs add` layout gives the CID we signed and announce
    assert pulled.verified.meta.name == "helia-seeded"
    assert same_tree(folder, tmp_path / "pulled")
