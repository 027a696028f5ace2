"""The on-disk block store: verified writes, atomic files, DAG walks in `ipfs dag export` order."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from protocol.content import blockstore as blockstore_module
from protocol.content import unixfs
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID
from protocol.errors import CommonsError, VerifyError

K = unixfs.CHUNK_SIZE


@pytest.fixture
def store(tmp_path: Path) -> BlockStore:
    return BlockStore(tmp_path / "blocks")


def _tree(root: Path) -> Path:
    for rel, data in {
        "adapter_config.json": b'{"r": 8}\n',
        "weights/a.bin": os.urandom(2 * K + 1),
        "weights/b.bin": b"\0" * (3 * K),  # three identical leaves: one block, exported once
        "README.md": b"# hi\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_root_is_under_commons_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMONS_HOME", str(tmp_path / "home"))
    assert BlockStore().root == tmp_path / "home" / "blocks"


def test_put_get_has_and_one_file_per_block(store: BlockStore) -> None:
    cid = unixfs.file_cid(b"hello world\n")
    block = b"\x0a\x12\x08\x02\x12\x0chello world\n\x18\x0c"
    assert not store.has(cid)
    store.put(cid, block)
    assert store.has(cid) and store.get(cid) == block
    digest = CID.decode(cid).digest.hex()
    assert (store.root / digest[:2] / digest).read_bytes() == block
    assert store.has(str(CID.decode(cid).to_v1())), "CIDv0 and CIDv1 of one block are one entry"


def test_put_refuses_a_block_that_does_not_match(store: BlockStore) -> None:
    cid = unixfs.file_cid(b"hello world\n")
    with pytest.raises(VerifyError, match="does not match"):
        store.put(cid, b"something else")
    assert not store.has(cid)


def test_get_of_absent_block_names_the_fix(store: BlockStore) -> None:
    cid = unixfs.file_cid(b"nothing here")
    with pytest.raises(CommonsError, match=f"{cid} is not in the store: fetch it"):
        store.get(cid)


def test_interrupted_write_leaves_no_block(store: BlockStore, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"\x0a\x04\x08\x02\x18\x00"
    cid = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(blockstore_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.put(cid, data)
    assert not store.has(cid)
    assert not [p for p in store.root.rglob("*") if p.is_file()], "temp file must be cleaned up"
    monkeypatch.undo()
    store.put(cid, data)
    assert store.get(cid) == data


def test_block_corrupted_on_disk_is_caught_and_dropped(store: BlockStore, tmp_path: Path) -> None:
    cid = store.add_path(_tree(tmp_path / "src"))
    leaf = next(c for c, _ in store.dag(cid) if c != cid)
    digest = CID.decode(leaf).digest.hex()
    (store.root / digest[:2] / digest).write_bytes(b"bit rot")
    with pytest.raises(VerifyError, match="corrupt on disk"):
        store.get(leaf)
    assert not store.has(leaf)
    assert leaf in store.missing(cid)


def test_add_path_matches_unixfs_and_exports_back(store: BlockStore, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    for version in (0, 1):
        cid = store.add_path(src, version)
        assert cid == unixfs.import_directory(src, version)
        out = tmp_path / f"out{version}"
        store.export(cid, out)
        assert _files(out) == _files(src)
    file_cid = store.add_path(src / "weights" / "a.bin")
    store.export(file_cid, tmp_path / "a.copy")
    assert (tmp_path / "a.copy").read_bytes() == (src / "weights" / "a.bin").read_bytes()
    with pytest.raises(CommonsError, match="is a directory but"):
        store.export(file_cid, tmp_path / "out0")


def _preorder(store: BlockStore, cid: str, seen: set[str]) -> list[str]:
    if cid in seen:
        return []
    seen.add(cid)
    out = [cid]
    for child in unixfs.block_links(cid, store.get(cid)):
        out += _preorder(store, child, seen)
    return out


def test_dag_is_depth_first_preorder_each_block_once(store: BlockStore, tmp_path: Path) -> None:
    root = store.add_path(_tree(tmp_path / "src"))
    order = [cid for cid, _ in store.dag(root)]
    assert order[0] == root
    assert order == _preorder(store, root, set())
    assert len(order) == len(set(order))
    zero_leaf = unixfs.file_cid(b"\0" * K)
    assert order.count(zero_leaf) == 1
    for cid, block in store.dag(root):
        assert hashlib.sha256(block).digest() == CID.decode(cid).digest


def test_missing_reports_what_is_not_held(store: BlockStore, tmp_path: Path) -> None:
    root = store.add_path(_tree(tmp_path / "src"))
    assert store.missing(root) == []
    absent = unixfs.file_cid(b"never stored")
    assert store.missing(absent) == [absent]
    leaves = [cid for cid, block in store.dag(root) if not unixfs.block_links(cid, block)]
    for leaf in leaves[:2]:
        digest = CID.decode(leaf).digest.hex()
        (store.root / digest[:2] / digest).unlink()
    assert sorted(store.missing(root)) == sorted(leaves[:2])
