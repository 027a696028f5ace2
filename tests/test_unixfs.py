"""UnixFS import must give exactly Kubo's CIDs: published vectors, the ipfs_cid oracle, Go's layout."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from protocol.content import dagpb, unixfs
from protocol.content.multiformats import CID, DAG_PB, RAW, b58decode, b58encode, varint_decode, varint_encode
from protocol.errors import CommonsError, VerifyError

K = unixfs.CHUNK_SIZE
ORACLE = shutil.which("ipfs_cid")  # Debian package ipfs-cid
needs_oracle = pytest.mark.skipif(ORACLE is None, reason="apt-get install ipfs-cid for the CID oracle")

# Published by Kubo's sharness tests (t0040-add-and-cat.sh) and the UnixFS spec.
FILE_VECTORS = [
    (b"", 0, "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"),
    (b"", 1, "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"),
    (b"hello world\n", 0, "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"),
    (b"Hello Worlds!\n", 0, "QmVr26fY1tKyspEJBniVhqxQeEjhF78XerGiqWAwraVLQH"),
    (b"Helloo Worlds!\n", 0, "Qmf35k66MZNW2GijohUmXQEWKZU4cCGTCwK6idfnt152wJ"),
    (b"IPFS\n", 0, "QmdFyxZXsFiP4csgfM5uPu99AvFiKH62CSPDw5TP92nr7w"),
    (b"Hello Venus!\n", 0, "QmU5kp3BH3B8tnWUU2Pikdb2maksBNkb92FHRr56hyghh4"),
    (b"Hello Jupiter!\n", 0, "QmUnvPcBctVTAcJpigv6KMqDvmDewksPWrNVoy1E1WP5fh"),
    (b"Hello Neptune!\nHello Pluton!", 0, "QmZDhWpi8NvKrekaYYhxKCdNVGWsFFe1CREnAjP1QbPaB3"),
    (b"Hello Mars!\n", 1, "bafkreibmlvvgdyihetgocpof6xk64kjjzdeq2e4c7hqs3krdheosk4tgj4"),
    (b"Hello Venus!\n", 1, "bafkreihfsphazrk2ilejpekyltjeh5k4yvwgjuwg26ueafohqioeo3sdca"),
]


@pytest.mark.parametrize(("data", "version", "expected"), FILE_VECTORS)
def test_published_file_vectors(data: bytes, version: int, expected: str) -> None:
    assert unixfs.file_cid(data, version) == expected


def test_cidv0_upgrades_to_the_published_base32_form() -> None:
    v0 = unixfs.file_cid(b"base32 test\n")
    assert str(CID.decode(v0).to_v1()) == "bafybeibyosqxljd2eptb4ebbtvk7pb4aoxzqa6ttdsflty6rsslz5y6i34"
    assert str(CID.decode(str(CID.decode(v0).to_v1()))) == str(CID.decode(v0).to_v1())


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


PLANETS = {"mars.txt": b"Hello Mars!\n", "venus.txt": b"Hello Venus!\n"}
MOONS = {
    "jupiter/europa.txt": b"Hello Europa!\n",
    "saturn/titan.txt": b"Hello Titan!\n",
    "mercury.txt": b"hey youre no moon!\n",
}


def test_published_directory_vectors(tmp_path: Path) -> None:
    planets = _tree(tmp_path / "planets", PLANETS)
    assert unixfs.import_directory(planets) == "QmWSgS32xQEcXMeqd3YPJLrNBLSdsfYCep2U7CFkyrjXwY"
    assert unixfs.import_directory(planets, 1) == (
        "bafybeih7e5dmkyk25up5vxug4q3hrg2fxbzf23dfrac2fns5h7z4aa7ioi")
    assert unixfs.import_directory(_tree(tmp_path / "moons", MOONS)) == (
        "QmVKvomp91nMih5j6hYBA8KjbiaYvEetU2Q7KvtZkLe9nQ")
    nested = _tree(tmp_path / "cur", {"hey": b"Hey\n", "hello/world": b"World\n"})
    assert unixfs.import_directory(nested) == "QmZQWnfcqJ6hNkkPvrY9Q5X39GP3jUnUbAV4AbmbbR3Cb1"
    (tmp_path / "empty").mkdir()
    assert unixfs.import_directory(tmp_path / "empty") == "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"


def test_hidden_entries_are_skipped_like_ipfs_add_r(tmp_path: Path) -> None:
    planets = _tree(tmp_path / "planets", PLANETS | {".secret": b"x", ".git/config": b"y"})
    assert unixfs.import_directory(planets) == "QmWSgS32xQEcXMeqd3YPJLrNBLSdsfYCep2U7CFkyrjXwY"


def _oracle(path: Path) -> dict:
    out = subprocess.run([ORACLE, str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def noise() -> bytes:
    return os.urandom(175 * K + 1)


@needs_oracle
@pytest.mark.parametrize("size", [0, 1, K - 1, K, K + 1, 3 * K + 5, 174 * K, 174 * K + 1, 175 * K])
def test_matches_the_oracle(tmp_path: Path, noise: bytes, size: int) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(noise[:size])
    assert unixfs.file_cid(path) == _oracle(path)["CIDv0"]


@needs_oracle
def test_thirty_megabytes_match_the_oracle_from_path_bytes_and_pipe(tmp_path: Path) -> None:
    data = os.urandom(30 * 1000 * 1000 + 12345)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    expected = _oracle(path)["CIDv0"]
    assert unixfs.file_cid(path) == expected
    assert unixfs.file_cid(data) == expected
    assert unixfs.file_cid(_Trickle(data)) == expected


@needs_oracle
def test_single_chunk_v1_base32_matches_the_oracle(tmp_path: Path) -> None:
    path = tmp_path / "one.bin"
    path.write_bytes(os.urandom(1000))
    assert str(CID.decode(unixfs.file_cid(path)).to_v1()) == _oracle(path)["CIDv1"]


class _Trickle(io.RawIOBase):
    """A pipe: readinto returns fewer bytes than asked; chunks must still be full 256 KiB."""

    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        return self.stream.readinto(memoryview(buf)[:65521])


def _go_balanced(leaves: list[unixfs.Entry], version: int) -> unixfs.Entry:
    """Transliteration of boxo's balanced.Layout / fillNodeRec, built eagerly (the reference)."""
    builder = unixfs._FileBuilder(version, None)
    pos = 0

    def fill(children: list[unixfs.Entry], depth: int) -> unixfs.Entry:
        nonlocal pos
        while len(children) < unixfs.MAX_LINKS and pos < len(leaves):
            if depth == 1:
                children.append(leaves[pos])
                pos += 1
            else:
                children.append(fill([], depth - 1))
        return builder._node(children)

    root = leaves[0]
    pos = 1
    depth = 1
    while pos < len(leaves):
        root = fill([root], depth)
        depth += 1
    return root


@pytest.mark.parametrize("version", [0, 1])
def test_streaming_layout_equals_gos_recursive_layout_at_depth_three_and_four(
    monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    monkeypatch.setattr(unixfs, "CHUNK_SIZE", 4)
    monkeypatch.setattr(unixfs, "MAX_LINKS", 3)
    data = os.urandom(4 * 90)
    for chunks in [2, 3, 4, 8, 9, 10, 26, 27, 28, 30, 55, 81, 82, 90]:
        piece = data[: 4 * chunks]
        leaves = [_leaf(piece[i:i + 4], version) for i in range(0, len(piece), 4)]
        streamed = unixfs._import_file_entry(piece, version, None, None)
        assert streamed == _go_balanced(leaves, version), chunks


def _leaf(chunk: bytes, version: int) -> unixfs.Entry:
    probe = unixfs._FileBuilder(version, None)
    probe.add_chunk(memoryview(chunk))
    return probe.levels[0][0]


def test_blocks_arrive_children_first_and_reassemble(tmp_path: Path) -> None:
    data = os.urandom(3 * K + 7)
    for version in (0, 1):
        blocks: dict[str, bytes] = {}

        def keep(cid: str, block: bytes, blocks: dict[str, bytes] = blocks) -> None:
            assert all(child in blocks for child in unixfs.block_links(cid, block))
            assert hashlib.sha256(block).digest() == CID.decode(cid).digest
            blocks[cid] = block

        root = unixfs.import_file(data, version, keep)
        assert len(blocks) == 5
        assert b"".join(unixfs.iter_file(blocks.__getitem__, root)) == data
        codecs = {CID.decode(cid).codec for cid in unixfs.block_links(root, blocks[root])}
        assert codecs == ({RAW} if version else {DAG_PB})


def test_internal_node_layout_is_kubos(tmp_path: Path) -> None:
    blocks: dict[str, bytes] = {}
    root = unixfs.import_file(b"a" * (K + 1), 0, lambda c, b: blocks.__setitem__(c, b))
    raw = blocks[root]
    assert raw[0] == 0x12, "links (field 2) come before Data (field 1)"
    links, data = dagpb.decode_node(raw)
    node = unixfs.decode_unixfs(data)
    assert (node.type, node.filesize, node.blocksizes, node.data) == (unixfs.T_FILE, K + 1, [K, 1], b"")
    assert [link.name for link in links] == ["", ""]
    assert [link.tsize for link in links] == [len(blocks[str(link.cid)]) for link in links]


def test_directory_round_trip_lists_and_exports(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", MOONS | {"big.bin": os.urandom(K + 3)})
    (src / "emptydir").mkdir()
    blocks: dict[str, bytes] = {}
    root = unixfs.import_directory(src, 1, lambda c, b: blocks.__setitem__(c, b))
    listing = unixfs.list_directory(blocks.__getitem__, root)
    assert [(rel, size) for rel, _, size in listing] == [
        ("big.bin", K + 3), ("jupiter/europa.txt", 14), ("mercury.txt", 19), ("saturn/titan.txt", 13)
    ]
    assert all(cid == unixfs.file_cid(src / rel, 1) for rel, cid, _ in listing)
    unixfs.export(blocks.__getitem__, root, tmp_path / "out")
    assert unixfs.import_directory(tmp_path / "out", 1) == root
    assert (tmp_path / "out" / "emptydir").is_dir()


def test_export_refuses_path_traversal_names(tmp_path: Path) -> None:
    leaf = CID.decode(unixfs.file_cid(b"x"))
    evil = dagpb.encode_node([dagpb.Link(leaf, "..", 10)], b"\x08\x01")
    evil_cid = str(CID(0, DAG_PB, hashlib.sha256(evil).digest()))
    blocks = {evil_cid: evil}
    with pytest.raises(VerifyError, match="unsafe entry name"):
        unixfs.export(blocks.__getitem__, evil_cid, tmp_path / "out")


def test_bad_input_gives_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(CommonsError, match="no such file: .*nope") as err:
        unixfs.file_cid(tmp_path / "nope")
    assert "\n" not in str(err.value)
    with pytest.raises(CommonsError, match="use 0 or 1"):
        unixfs.file_cid(b"x", 2)
    with pytest.raises(CommonsError, match="is a directory"):
        unixfs.file_cid(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path / "d")
    with pytest.raises(CommonsError, match="symlink"):
        unixfs.import_directory(tmp_path / "d")


def test_directories_kubo_would_shard_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "many"
    big.mkdir()
    for i in range(920):  # 920 * (250-byte name + 34-byte CID) > 256 KiB
        (big / f"{i:04d}{'n' * 246}").write_bytes(b"")
    with pytest.raises(CommonsError, match="split it into subfolders"):
        unixfs.import_directory(big)


def test_large_file_import_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    with path.open("wb") as fh:
        for _ in range(40):
            fh.write(os.urandom(K))
    tracemalloc.start()
    try:
        unixfs.file_cid(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * K, f"peak {peak} bytes: import must not hold the file in memory"


def test_multiformat_primitives_round_trip() -> None:
    for value in (0, 1, 127, 128, 300, 2**32, 2**63):
        assert varint_decode(varint_encode(value)) == (value, len(varint_encode(value)))
    for raw in (b"", b"\0\0abc", os.urandom(34)):
        assert b58decode(b58encode(raw)) == raw
    with pytest.raises(CommonsError, match="not a CID"):
        CID.decode("hello")
    cid = CID.decode("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
    assert (cid.version, cid.codec, cid.digest) == (1, RAW, hashlib.sha256(b"").digest())
    assert CID.decode(cid.to_bytes()) == cid
