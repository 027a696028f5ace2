"""Real servers and real CLI processes for the attack tests: a uvicorn index on loopback, `commons ...`.

    >>> with serve_index(tmp_path / "index") as index:  # its own database and block store
    ...     index.publish(folder_meta, alice)           # signed, stored, registered as `commons publish` does
    ...     code, out, err = commons("pull", "name", "--index", index.url, cwd=tmp_path)
    >>> index = IndexProcess(tmp_path / "home")         # `commons index serve --p2p-listen`, a process

Crafted DAGs (what an attacker builds by hand) come from `directory_node` and `file_node`: dag-pb blocks
in Kubo's encoding, put straight into a block store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from index.app import create_app
from index.db import IndexDB
from index.sample import make_entry
from protocol.content import dagpb
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID, DAG_PB, RAW
from protocol.content.unixfs import T_DIRECTORY, T_FILE
from protocol.signing.keys import Identity
from protocol.signing.manifest import AdapterMeta

COMMONS = str(Path(sys.executable).parent / "commons")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def commons(*args: str, cwd: Path, timeout: float = 60) -> tuple[int, str, str]:
    """The installed console script as a user runs it (COMMONS_HOME comes from the test's environment)."""
    done = subprocess.run([COMMONS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)
    return done.returncode, done.stdout, done.stderr


@dataclass
class LiveIndex:
    url: str
    db: IndexDB
    store: BlockStore
    root: Path

    def publish(self, name: str, who: Identity, version: int = 1, register: bool = True,
                **fields: object) -> tuple[bytes, str]:
        """A signed sample adapter stored in the index's block store (and registered): (model.sig, CID)."""
        meta = AdapterMeta(name=name, version=version, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                           license="Apache-2.0", **fields)  # type: ignore[arg-type]
        folder = self.root / "published" / f"{name}-{version}-{who.public_hex[:8]}"
        envelope, cid = make_entry(folder, meta, who, self.store)
        if register:
            self.db.register(envelope, cid)
        return envelope, cid


@contextlib.contextmanager
def serve_index(root: Path, **app_kw: object) -> Iterator[LiveIndex]:
    """The index app (pages, API, trustless gateway) on a loopback port, uvicorn in a thread."""
    root.mkdir(parents=True, exist_ok=True)
    db = IndexDB(f"sqlite:///{root / 'index.db'}")
    store = BlockStore(root / "blocks")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(db, store, **app_kw), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield LiveIndex(f"http://127.0.0.1:{port}", db, store, root)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class IndexProcess:
    """`commons index serve --p2p-listen` in its own process and home: HTTP at `url`, libp2p at `addr`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.peer_id = Identity.load_or_create(home / "identity" / "ed25519.key").peer_id()
        http, p2p = free_port(), free_port()
        self.url = f"http://127.0.0.1:{http}"
        self.addr = f"/ip4/127.0.0.1/tcp/{p2p}/p2p/{self.peer_id}"
        self.log = open(home / "index.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [COMMONS, "index", "serve", "--port", str(http), "--p2p-listen", f"/ip4/127.0.0.1/tcp/{p2p}"],
            cwd=ROOT, env={**os.environ, "COMMONS_HOME": str(home)}, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"index exited: {(home / 'index.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/api/p2p", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"index did not start: {(home / 'index.log').read_text()[-2000:]}")

    def p2p(self) -> dict:
        return httpx.get(f"{self.url}/api/p2p", timeout=5).json()

    def wait(self, predicate, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.p2p()
            if predicate(stats):
                return stats
            time.sleep(0.2)
        raise AssertionError(f"index never got there: {self.p2p()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# --- crafted DAGs ----------------------------------------------------------------------------------------


def put(store: BlockStore, block: bytes, codec: int = DAG_PB) -> CID:
    cid = CID(0 if codec == DAG_PB else 1, codec, hashlib.sha256(block).digest())
    store.put(str(cid), block)
    return cid


def raw_leaf(store: BlockStore, data: bytes) -> CID:
    return put(store, data, RAW)


def file_node(store: BlockStore, links: list[CID], data: bytes = b"", filesize: int | None = None) -> CID:
    """A UnixFS File node; `filesize` may lie (it defaults to len(data))."""
    size = len(data) if filesize is None else filesize
    unixfs = b"\x08" + bytes([T_FILE]) + (b"\x12" + _varint(len(data)) + data if data else b"") + b"\x18" + \
        _varint(size)
    return put(store, dagpb.encode_node([dagpb.Link(c, "", 0) for c in links], unixfs))


def directory_node(store: BlockStore, entries: dict[str, CID]) -> CID:
    links = [dagpb.Link(cid, name, 0) for name, cid in sorted(entries.items())]
    return put(store, dagpb.encode_node(links, b"\x08" + bytes([T_DIRECTORY])))


def directory_entries(store: BlockStore, cid: str) -> dict[str, CID]:
    links, _ = dagpb.decode_node(store.get(cid))
    return {link.name: link.cid for link in links}


def _varint(value: int) -> bytes:
    from protocol.content.multiformats import varint_encode

    return varint_encode(value)
