"""`/commons/blocks/1.0.0`: serve a BlockStore's blocks; fetch a whole DAG from peers, pipelined.

Why not py-libp2p's bitswap: its MerkleDag builds CIDs that differ from Kubo's for multi-chunk files
and it refuses blocks over 512 KiB. Our protocol is one request/response pair per block on a stream:

    request  = frame(binary CID)
    response = frame(b"\\x01" + block)   # have it
             | frame(b"\\x00")           # don't have it

Responses come back in request order, so a client keeps `window` requests in flight per stream and
opens `streams` streams per peer (yamux flow control is per stream). Every block is re-hashed against
its CID before it is stored; a peer that sends a wrong block is dropped. Blocks already in the store
are never fetched again, so an interrupted pull resumes where it stopped.

    >>> report = fetch_dag("Qm...", BlockStore(), ["/ip4/10.0.0.1/tcp/4051/p2p/12D3KooW..."])
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from tqdm import tqdm

from protocol.content.multiformats import CID
from protocol.content.unixfs import block_links
from protocol.errors import CommonsError, VerifyError
from protocol.p2p import host as hostlib
from protocol.p2p.wire import STREAM_ERRORS, FrameError, FrameReader, Pacer, frame

BLOCKS_PROTOCOL = TProtocol("/commons/blocks/1.0.0")
HAVE, DONT_HAVE = b"\x01", b"\x00"
STREAMS_PER_PEER = 4
WINDOW = 8
STALL_S = 30.0

OnBlock = Callable[[str, int], None]
T = TypeVar("T")


# ---------------------------------------------------------------- serving


def block_handler(store, rate_limit: float | None = None, pacer: Pacer | None = None
                  ) -> Callable[[INetStream], object]:
    """A stream handler answering block requests from `store`, optionally capped at rate_limit bytes/s
    (or by `pacer`, which bitswap shares) for every stream and peer together."""
    if pacer is None and rate_limit:
        pacer = Pacer(rate_limit)

    async def handle(stream: INetStream) -> None:
        reader = FrameReader(stream)
        try:
            while True:
                request = await reader.read()
                try:
                    cid = str(CID.decode(request))
                except CommonsError:
                    return  # not speaking our protocol: hang up
                try:
                    block = store.get(cid) if store.has(cid) else None
                except CommonsError:  # rotted on disk (the store just dropped it) or vanished meanwhile
                    block = None
                await stream.write(frame(HAVE + block) if block is not None else frame(DONT_HAVE))
                if block is not None and pacer is not None:
                    await pacer.pace(len(block))
        except (*STREAM_ERRORS, FrameError):
            pass
        finally:
            with trio.move_on_after(1):
                await stream.close()

    return handle


def serve_blocks(host: IHost, store, rate_limit: float | None = None, pacer: Pacer | None = None) -> None:
    host.set_stream_handler(BLOCKS_PROTOCOL, block_handler(store, rate_limit, pacer))


# ---------------------------------------------------------------- fetching


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


class _PeerFailed(Exception):
    pass


@dataclass
class _Peer:
    addr: str
    peer_id: ID
    refused: set[str] = field(default_factory=set)
    alive: bool = True


class DagFetch:
    """Shared state of one DAG pull: the work queue, what is outstanding, the live peers (bitswap's
    fetch walks with it too)."""

    def __init__(self, root: str, store, on_block: OnBlock | None, bar: tqdm | None,
                 stall_s: float = STALL_S) -> None:
        self.root = root
        self.stall_s = stall_s
        self.store = store
        self.on_block = on_block
        self.bar = bar
        self.seen: set[str] = set()
        self.remaining = 0
        self.todo_send, self.todo_recv = trio.open_memory_channel[str](float("inf"))
        self.done = trio.Event()
        self.peers: list[_Peer] = []
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

    def peer_died(self, peer: _Peer, reason: str) -> None:
        peer.alive = False
        self.report.peers_failed[peer.addr] = reason
        if not any(p.alive for p in self.peers) and self.remaining:
            got = self.report.blocks + self.report.already_held
            self.fail(
                f"all peers failed with {self.remaining} blocks of {self.root} still missing "
                f"({got} kept; last: {reason}): pull again from another peer to resume"
            )

    # -- one stream: a sender keeps up to `window` requests in flight, a receiver matches answers in order
    async def run_stream(self, host: IHost, peer: _Peer, window: int) -> None:
        with trio.fail_after(hostlib.CONNECT_TIMEOUT):
            stream = await host.new_stream(peer.peer_id, [BLOCKS_PROTOCOL])
        reader = FrameReader(stream)
        inflight: deque[str] = deque()
        slots = trio.Semaphore(window)

        async def send() -> None:
            while True:
                await slots.acquire()
                cid = await self.todo_recv.receive()
                if cid in peer.refused:
                    self.requeue_refused(peer, cid)
                    slots.release()
                    await trio.sleep(0.01)  # let a peer that has it pick it up
                    continue
                inflight.append(cid)
                await stream.write(frame(CID.decode(cid).to_bytes()))

        async def receive() -> None:
            while True:
                with trio.move_on_after(self.stall_s) as idle:
                    answer = await reader.read()
                if idle.cancelled_caught:
                    if inflight:  # asked and not answered: a hung peer must not hang the pull
                        raise _PeerFailed(f"no answer in {self.stall_s:g}s")
                    continue
                cid = inflight.popleft()
                slots.release()
                if answer[:1] == HAVE:
                    try:
                        self.accept(cid, answer[1:])
                    except VerifyError as exc:
                        self.todo_send.send_nowait(cid)
                        raise _PeerFailed(str(exc)) from None
                elif answer == DONT_HAVE:
                    peer.refused.add(cid)
                    self.requeue_refused(peer, cid)
                else:
                    raise _PeerFailed("malformed answer")

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
        finally:
            for cid in inflight:  # nothing asked of a dead peer is lost
                self.todo_send.send_nowait(cid)
            inflight.clear()

    def requeue_refused(self, peer: _Peer, cid: str) -> None:
        if all(cid in p.refused for p in self.peers if p.alive):
            self.fail(f"no connected peer has block {cid} of {self.root}: add a peer that seeds it")
        else:
            self.todo_send.send_nowait(cid)

    async def run_peer(self, host: IHost, peer: _Peer, streams: int, window: int) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(self.run_stream, host, peer, window)
        except* (_PeerFailed, FrameError, IndexError, trio.TooSlowError, *STREAM_ERRORS) as group:
            self.peer_died(peer, _first_reason(group))


def _first_reason(error: BaseException) -> str:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, _PeerFailed) else f"{type(error).__name__}: {text}".rstrip(": ")


async def fetch_dag_async(
    host: IHost,
    root: str,
    store,
    peers: Sequence[str],
    progress: bool = False,
    on_block: OnBlock | None = None,
    streams: int = STREAMS_PER_PEER,
    window: int = WINDOW,
    stall_s: float = STALL_S,
) -> FetchReport:
    """Pulls every block of `root` missing from `store` from `peers` (full multiaddrs) over `host`."""
    root = str(CID.decode(root))
    for addr in peers:
        hostlib.peer_info(addr)  # a mistyped address is an error even when nothing needs fetching
    start = time.perf_counter()
    bar = tqdm(desc=f"pull {root[:12]}…", unit="blk", disable=not progress, leave=False) if progress else None
    job = DagFetch(root, store, on_block, bar, stall_s)
    try:
        job.discover(root)
        if job.remaining == 0:
            return job.report
        for addr in peers:
            try:
                info = await hostlib.connect(host, addr)
            except CommonsError as exc:
                job.report.peers_failed[addr] = str(exc)
                continue
            job.peers.append(_Peer(addr, info.peer_id))
        if not job.peers:
            reasons = "; ".join(job.report.peers_failed.values()) or "no peers given"
            raise CommonsError(f"no peer reachable for {root} ({reasons})")
        async with trio.open_nursery() as nursery:
            for peer in job.peers:
                nursery.start_soon(job.run_peer, host, peer, streams, window)
            await job.done.wait()
            nursery.cancel_scope.cancel()
        if job.error is not None:
            raise job.error
        return job.report
    finally:
        job.report.seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()


def fetch_dag(
    root: str,
    store,
    peers: Sequence[str],
    progress: bool = True,
    on_block: OnBlock | None = None,
    seed: bytes | None = None,
) -> FetchReport:
    """Blocking wrapper: a short-lived host (throwaway key unless `seed`) pulls the DAG, then exits."""
    return run_client(seed, lambda host: fetch_dag_async(host, root, store, peers, progress=progress,
                                                         on_block=on_block))


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


class PeerSource:
    """A block source (see docs/INTERFACES.md "Fetching") backed by libp2p peers.

    `fetch_dag(root, store, progress)` is the fast path (pipelined, many peers); `get_block` starts a
    host per call and is only for callers that insist on one block at a time.
    """

    def __init__(self, peers: Sequence[str], seed: bytes | None = None) -> None:
        if not peers:
            raise CommonsError("PeerSource needs a peer address or more: /ip4/.../tcp/.../p2p/12D3KooW...")
        self.peers = list(peers)
        self.seed = seed
        self.name = f"libp2p:{self.peers[0]}" + (f" (+{len(self.peers) - 1})" if len(self.peers) > 1 else "")

    def fetch_dag(self, root: str, store, progress: bool = True) -> FetchReport:
        return fetch_dag(root, store, self.peers, progress=progress, seed=self.seed)

    def get_block(self, cid: str) -> bytes | None:
        async def first(host: IHost) -> bytes | None:
            for addr in self.peers:
                try:
                    block = await _request_one(host, addr, cid)
                except (CommonsError, *STREAM_ERRORS, FrameError):
                    continue
                if block is not None:
                    return block
            return None

        return run_client(self.seed, first)


async def _request_one(host: IHost, addr: str, cid: str) -> bytes | None:
    info = await hostlib.connect(host, addr)
    stream = await host.new_stream(info.peer_id, [BLOCKS_PROTOCOL])
    try:
        await stream.write(frame(CID.decode(cid).to_bytes()))
        answer = await FrameReader(stream).read()
    finally:
        with trio.move_on_after(1):
            await stream.close()
    if answer[:1] != HAVE:
        return None
    verify_block(cid, answer[1:])
    return answer[1:]
