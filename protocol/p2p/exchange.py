"""What a DAG fetch over libp2p needs whatever protocol carries the blocks (bitswap, protocol.p2p.bitswap):
the walk, its report, and a short-lived client host.

    >>> job = DagFetch(root, store, on_block=None, bar=None)
    >>> job.discover(root)          # held blocks are walked locally; missing ones go on job.todo_recv
    >>> job.accept(cid, block)      # re-hashed against its CID, stored, its children discovered
    >>> await job.done.wait()       # every block held (or job.fail(...) said why not: job.error)

Blocks already in the store are never fetched again, so an interrupted pull resumes where it stopped.
Our nodes once also spoke `/commons/blocks/1.0.0` (one request/answer per block, in order); bitswap
measured the same speed (0.97-1.09x) and every IPFS node speaks it, so it replaced it (docs/p2p.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from libp2p.abc import IHost
from tqdm import tqdm

from protocol.content.multiformats import CID
from protocol.content.unixfs import block_links
from protocol.errors import CommonsError, VerifyError
from protocol.p2p import host as hostlib

OnBlock = Callable[[str, int], None]
T = TypeVar("T")


def verify_block(cid: str, block: bytes) -> None:
    """VerifyError unless block hashes to cid (sha2-256 is the only hash our CIDs carry)."""
    if hashlib.sha256(block).digest() != CID.decode(cid).digest:
        raise VerifyError(f"block {cid} does not match its CID: the peer sent corrupt data; try another peer")


@dataclass
class FetchReport:
    root: str
    blocks: int = 0  # fetched over the network this time
    bytes: int = 0
    already_held: int = 0
    seconds: float = 0.0
    peers_failed: dict[str, str] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


class DagFetch:
    """Shared state of one DAG pull: the work queue, how many blocks are outstanding, the report."""

    def __init__(self, root: str, store, on_block: OnBlock | None, bar: tqdm | None) -> None:
        self.root = root
        self.store = store
        self.on_block = on_block
        self.bar = bar
        self.seen: set[str] = set()
        self.remaining = 0
        self.todo_send, self.todo_recv = trio.open_memory_channel[str](float("inf"))
        self.done = trio.Event()
        self.error: CommonsError | None = None
        self.report = FetchReport(root)

    # -- discovery: held blocks are walked locally, missing ones queued
    def discover(self, cid: str) -> None:
        stack = [cid]
        while stack:
            current = stack.pop()
            if current in self.seen:
                continue
            self.seen.add(current)
            if self.store.has(current):
                self.report.already_held += 1
                stack.extend(block_links(current, self.store.get(current)))
            else:
                self.remaining += 1
                self.todo_send.send_nowait(current)
        if self.bar is not None:
            self.bar.total = self.remaining + self.report.blocks
            self.bar.refresh()

    def accept(self, cid: str, block: bytes) -> None:
        verify_block(cid, block)
        self.store.put(cid, block)
        self.report.blocks += 1
        self.report.bytes += len(block)
        self.remaining -= 1
        if self.bar is not None:
            self.bar.update(1)
        if self.on_block is not None:
            self.on_block(cid, len(block))
        for child in block_links(cid, block):
            self.discover(child)
        if self.remaining == 0:
            self.done.set()

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = CommonsError(message)
        self.done.set()


def run_client(seed: bytes | None, work: Callable[[IHost], Awaitable[T]]) -> T:
    """trio.run(work(host)) with a listening host; a CommonsError comes out bare, not in a group."""

    async def main() -> T:
        host = hostlib.make_host(seed)
        async with host.run(listen_addrs=hostlib.listen_addrs([hostlib.LOCAL_LISTEN])):
            return await work(host)

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        raise unwrap(group) from None


def unwrap(group: BaseExceptionGroup) -> BaseException:
    """The first CommonsError inside nested task groups (what the user should see), else the group."""
    matched, _ = group.split(CommonsError)
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched if matched is not None else group
