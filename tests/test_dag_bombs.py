"""DAG bombs: validly signed manifests over DAGs that repeat a child, nest too deep, or lie about sizes.

Pull (a real `commons pull` process), the index's announce door and a volunteer fetching a campaign dataset
must each refuse in one line within seconds, before writing any file and having fetched about what the
manifest promised at most.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import httpx
import pytest
from live_index import LiveIndex, commons, directory_node, file_node, raw_leaf, serve_index

from protocol.content import unixfs
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID
from protocol.errors import VerifyError
from protocol.signing.dsse import canonical_json, envelope_bytes, sign_envelope
from protocol.signing.keys import Identity
from protocol.signing.manifest import SIGNATURE_FILE, AdapterMeta, build_statement

CHUNK = unixfs.CHUNK_SIZE


def repeating(store: BlockStore) -> CID:
    """Four blocks of ~4 KiB whose links walk a 256 KiB leaf 10^6 times: 256 GB once expanded."""
    node = raw_leaf(store, b"\0" * CHUNK)
    for _ in range(3):
        node = file_node(store, [node] * 100, filesize=4096)
    return node


def wide(store: BlockStore) -> CID:
    """Three distinct blocks, as deep as a 175-chunk file may be, whose repeats walk 30 451 nodes: 7.9 GB."""
    leaf = raw_leaf(store, b"\0" * CHUNK)
    return file_node(store, [file_node(store, [leaf] * 174)] * 174, filesize=175 * CHUNK)


def deep(store: BlockStore, depth: int = 3000) -> CID:
    """A chain of single-link file nodes, far deeper than any real adapter (Kubo's is ≤ 5 for 2 GiB)."""
    node = raw_leaf(store, b"0123456789")
    for _ in range(depth):
        node = file_node(store, [node], filesize=10)
    return node


def lying(store: BlockStore) -> CID:
    """A root that says 10 bytes over 40 distinct 256 KiB leaves (10 MiB)."""
    return file_node(store, [raw_leaf(store, os.urandom(CHUNK)) for _ in range(40)], filesize=10)


BOMBS = {"repeating": (repeating, 4096), "wide": (wide, 175 * CHUNK), "deep": (deep, 10),
         "lying": (lying, 10)}


def signed_dag(store: BlockStore, who: Identity, name: str, data_name: str, data: CID, size: int,
               kind: str = "adapter") -> tuple[bytes, str]:
    """A directory whose model.sig really is signed by `who` and lists `data` with the claimed size."""
    config = b'{"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}'
    config_cid = unixfs.import_file(config, 0, store.put)
    files = [{"name": "adapter_config.json", "size": len(config),
              "sha256": hashlib.sha256(config).hexdigest(),
              "cid": config_cid},
             {"name": data_name, "size": size, "sha256": "0" * 64, "cid": str(data)}]
    statement = build_statement(AdapterMeta(name=name, kind=kind), files)
    envelope = envelope_bytes(sign_envelope(canonical_json(statement), who))
    sig_cid = unixfs.import_file(envelope, 0, store.put)
    entries = {"adapter_config.json": CID.decode(config_cid), data_name: data,
               SIGNATURE_FILE: CID.decode(sig_cid)}
    return envelope, str(directory_node(store, entries))


def held_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory):
    with serve_index(tmp_path_factory.mktemp("bomb-index")) as live:
        yield live


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_pull_refuses_a_signed_dag_bomb_in_seconds_writing_nothing(index: LiveIndex, bomb: str,
                                                                   tmp_path: Path,
                                                                   isolated_home: Path) -> None:
    build, size = BOMBS[bomb]
    _, root = signed_dag(index.store, Identity.generate(), f"bomb-{bomb}", "adapter_model.safetensors",
                         build(index.store), size)
    start = time.monotonic()
    code, _, err = commons("pull", root, "--index", index.url, "--out", str(tmp_path / "out"), cwd=tmp_path,
                           timeout=120)
    elapsed = time.monotonic() - start
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "adapter_model.safetensors" in err and "refusing" in err, err
    assert elapsed < 15, elapsed
    assert not (tmp_path / "out").exists()
    # no more than the manifest promised, and then some
    assert held_bytes(isolated_home / "blocks") < 2 * CHUNK
    print(f"{bomb}: refused in {elapsed:.2f}s, {held_bytes(isolated_home / 'blocks')} bytes of blocks kept")


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_the_index_refuses_to_register_a_signed_dag_bomb(index: LiveIndex, bomb: str) -> None:
    build, size = BOMBS[bomb]
    envelope, root = signed_dag(index.store, Identity.generate(), f"announced-{bomb}",
                                "adapter_model.safetensors", build(index.store), size)
    start = time.monotonic()
    reply = httpx.post(f"{index.url}/api/announce", json={"envelope": envelope.decode(), "cid": root},
                       timeout=60)
    assert reply.status_code == 403 and "adapter_model.safetensors" in reply.json()["detail"], reply.text
    assert time.monotonic() - start < 10
    assert httpx.get(f"{index.url}/api/resolve/announced-{bomb}").status_code == 404


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_volunteer_refuses_a_dataset_bomb_before_caching_anything(index: LiveIndex, bomb: str,
                                                                     tmp_path: Path) -> None:
    from node.data import dataset_records

    build, size = BOMBS[bomb]
    _, root = signed_dag(index.store, Identity.generate(), f"data-{bomb}", "data.jsonl", build(index.store),
                         size, kind="dataset")
    start = time.monotonic()
    with pytest.raises(VerifyError, match="data.jsonl") as err:
        dataset_records(root, BlockStore(tmp_path / "blocks"), index.url, tmp_path / "datasets")
    assert "\n" not in str(err.value) and time.monotonic() - start < 15
    assert not (tmp_path / "datasets").exists() or not any((tmp_path / "datasets").iterdir())
    assert held_bytes(tmp_path / "blocks") < 2 * CHUNK



def test_pull_refuses_a_manifest_promising_more_than_the_disk_holds_before_fetching(
        index: LiveIndex, tmp_path: Path, isolated_home: Path) -> None:
    """Each file within the 2 GiB bound, but 3000 of them: 6 TB, far past the free disk."""
    size = 2 * 1024**3 - 1
    leaf = file_node(index.store, [raw_leaf(index.store, b"\0" * CHUNK)], filesize=size)
    files = [{"name": f"shard-{i:04d}.safetensors", "size": size, "sha256": "0" * 64, "cid": str(leaf)}
             for i in range(3000)]
    statement = build_statement(AdapterMeta(name="terabytes", kind="adapter"), files)
    envelope = envelope_bytes(sign_envelope(canonical_json(statement), Identity.generate()))
    entries = {f["name"]: leaf for f in files}
    entries[SIGNATURE_FILE] = CID.decode(unixfs.import_file(envelope, 0, index.store.put))
    root = str(directory_node(index.store, entries))
    code, _, err = commons("pull", root, "--index", index.url, "--out", str(tmp_path / "out"), cwd=tmp_path,
                           timeout=120)
    assert code == 1 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "terabytes promises 6442.5 GB of files and needs twice that" in err, err
    assert "free space or set COMMONS_HOME to a larger disk" in err
    assert not (tmp_path / "out").exists()
    # the folder and its 1 MB model.sig, no data
    assert held_bytes(isolated_home / "blocks") < 2 * 1024 * 1024
