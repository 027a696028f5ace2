"""Bitswap (`/ipfs/bitswap/1.2.0`, 1.1.0, 1.0.0) on our host: serve a BlockStore to Kubo and Helia,
and fetch blocks and whole DAGs from them (or from another commons node) into it.

A message travels one way; the answer is a message on the answerer's own outgoing stream:

    we                                                  peer
    ── want-block C, send-dont-have ──(our stream)──────▶ its wantlist for us: C
    ◀─────────────(its stream)── payload: prefix + block   (or presence: dont-have C)
    ── cancel C ──────────────────(our stream)──────────▶ only to peers asked but not answered

Each side keeps one outgoing stream per peer, reopened when the peer has closed it (Helia drops a stream
after 10 s without a message, so ours is closed after IDLE_CLOSE_S). Messages are uvarint-length
protobufs (protocol.p2p.bitswap_message); a received block is hashed into its CID, so it can only
answer the want for its own bytes. A want goes to one peer at a time (want-block with
send-dont-have): a peer that says dont-have, stays silent for `stall_s`, breaks its stream or
disconnects (noticed within IDLE_CLOSE_S) sends us to the next, so several peers share a pull
without sending a block twice. A peer that sends a block nobody asked for (a corrupt block hashes to
a CID no want has) is not asked again by this host; one that disconnects or stalls is not asked again
within the same DAG fetch, which reports it in `FetchReport.peers_failed`.

    >>> async with open_bitswap(host, store) as swap:          # serve `store`, and fetch
    ...     report = await fetch_dag_async(swap, "Qm...", store, ["/ip4/.../p2p/12D3KooW..."])
    >>> BitswapSource(["/ip4/.../p2p/12D3KooW..."]).get_block("bafy...")   # for protocol.content.fetch
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from itertools import count
from typing import Self

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from tqdm import tqdm

from protocol.content.multiformats import CID
from protocol.errors import CommonsError
from protocol.p2p import host as hostlib
from protocol.p2p.background import Background
from protocol.p2p.bitswap_message import (
    BITSWAP_100,
    BITSWAP_110,
    BITSWAP_120,
    DONT_HAVE,
    HAVE,
    WANT_BLOCK,
    Entry,
    Message,
)
from protocol.p2p.exchange import DagFetch, FetchReport, OnBlock, run_client, unwrap
from protocol.p2p.wire import STREAM_ERRORS, FrameError, FrameReader, Pacer, frame

PROTOCOLS = [TProtocol(BITSWAP_120), TProtocol(BITSWAP_110), TProtocol(BITSWAP_100)]  # preferred first
MAX_MESSAGE = (4 << 20) + (64 << 10)  # Helia and Kubo split their messages at 4 MiB
MESSAGE_BYTES = 1 << 20  # blocks we pack into one message before sending it
MAX_WANTLIST = 4096  # entries kept per peer; more are ignored until some are answered
HAVE_AS_BLOCK = 1024  # a want-have for a block this small gets the block itself (as Kubo and Helia do)
IDLE_CLOSE_S = 5.0  # our idle outgoing streams
INBOUND_IDLE_S = 60.0  # a peer's silent stream to us
STALL_S = 30.0
WINDOW = 32  # blocks in flight in one DAG fetch
RECENT = 4096  # wants remembered once done, so a late duplicate is not taken for a lie
REMEMBERED = 10_000  # peers remembered as gone or lying (ids cost nothing to make: bounded)
LIAR = "sent a block that hashes to no CID asked for (corrupt or forged)"


class _Remote:
    """One peer: its wantlist (what we owe it) and our want/cancel entries not yet sent to it."""

    def __init__(self, peer_id: ID) -> None:
        self.peer_id = peer_id
        self.wants: dict[bytes, Entry] = {}  # by digest, in arrival order
        self.due: dict[bytes, None] = {}  # wants not looked at yet (an ordered set)
        self.outgoing: dict[bytes, Entry] = {}
        self.wake = trio.Event()
        self.stream: INetStream | None = None
        self.protocol = BITSWAP_120


class _Want:
    """A block we wait for: who was asked, who said dont-have, the block once it came."""

    def __init__(self, cid: CID) -> None:
        self.cid = cid
        self.block: bytes | None = None
        self.sender: ID | None = None
        self.asked: set[ID] = set()
        self.refused: set[ID] = set()
        self.news = trio.Event()
        self.waiters = 0

    def changed(self) -> None:
        self.news.set()
        self.news = trio.Event()


class Bitswap:
    """One host's bitswap: answers what peers want from `store` (None: nothing), fetches what we want."""

    def __init__(self, host: IHost, store=None, pacer: Pacer | None = None) -> None:
        self.host = host
        self.store = store
        self.pacer = pacer
        self.remotes: dict[ID, _Remote] = {}
        self.wants: dict[bytes, _Want] = {}
        self.recent: OrderedDict[bytes, None] = OrderedDict()  # wants done lately
        self.gone: dict[ID, str] = {}  # why a peer's sender stopped (until we talk to it again)
        self.liars: dict[ID, str] = {}  # never asked again
        self.nursery: trio.Nursery | None = None
        self.blocks_sent = 0

    # -- receiving: every stream a peer opens to us carries messages until it closes it
    async def handle(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        reader = FrameReader(stream, MAX_MESSAGE)
        try:
            while True:
                with trio.move_on_after(INBOUND_IDLE_S) as idle:
                    payload = await reader.read()
                if idle.cancelled_caught:
                    return  # a peer with news opens a new stream
                self.received(peer_id, Message.decode(payload))
        except (*STREAM_ERRORS, FrameError, CommonsError):  # MessageError, or bitswap shut down
            pass  # the peer closed its stream (the usual end) or broke it
        finally:
            with trio.move_on_after(1):
                await stream.close()

    def received(self, peer_id: ID, message: Message) -> None:
        remote = self._remote(peer_id)
        if message.full:
            remote.wants.clear()
            remote.due.clear()
        for entry in message.wantlist:
            key = entry.cid.digest
            if entry.cancel:
                remote.wants.pop(key, None)
                remote.due.pop(key, None)
            elif key in remote.wants or len(remote.wants) < MAX_WANTLIST:
                remote.wants[key] = entry
                remote.due[key] = None
        for cid, block in message.blocks:
            want = self.wants.get(cid.digest)
            if want is None and cid.digest not in self.recent:
                self._lied(peer_id)
            elif want is not None and want.block is None:
                want.block, want.sender = block, peer_id
                want.changed()
        for cid, kind in message.presences:
            want = self.wants.get(cid.digest)
            if want is not None and kind == DONT_HAVE:
                want.refused.add(peer_id)
                want.changed()
        if remote.due:
            remote.wake.set()

    def stored(self, cid: CID) -> None:
        """A block just landed in our store: peers that asked us for it earlier get it now."""
        for remote in self.remotes.values():
            if cid.digest in remote.wants:
                remote.due[cid.digest] = None
                remote.wake.set()

    # -- sending: one task per peer packs what is due into messages on its outgoing stream
    def _remote(self, peer_id: ID) -> _Remote:
        remote = self.remotes.get(peer_id)
        if remote is None:
            if self.nursery is None:
                raise CommonsError("bitswap is not running: use it inside `async with open_bitswap(...)`")
            remote = self.remotes[peer_id] = _Remote(peer_id)
            self.gone.pop(peer_id, None)
            self.nursery.start_soon(self._sender, remote)
        return remote

    async def _sender(self, remote: _Remote) -> None:
        why = "bitswap stopped"
        try:
            while True:
                with trio.move_on_after(IDLE_CLOSE_S) as idle:
                    await remote.wake.wait()
                if idle.cancelled_caught:
                    await _close(remote)  # before the peer times the idle stream out
                    if not self.host.get_network().get_connections(remote.peer_id):
                        why = "disconnected"
                        return  # forgotten below, so a long-lived node keeps no dead peers
                    continue
                remote.wake = trio.Event()
                while message := self._next_message(remote):
                    await self._send(remote, message)
        except trio.TooSlowError:
            why = f"no stream opened in {hostlib.CONNECT_TIMEOUT:g}s"
        except STREAM_ERRORS as exc:  # gone: what we asked of it counts as refused below
            text = str(exc).splitlines()[0] if str(exc) else ""
            why = f"{type(exc).__name__}: {text}".rstrip(": ")
        finally:
            _bounded_put(self.gone, remote.peer_id, why)
            self._forget(remote)
            await _close(remote)

    def _next_message(self, remote: _Remote) -> Message | None:
        message = Message(wantlist=list(remote.outgoing.values()))
        remote.outgoing.clear()
        size = 0
        while remote.due and size < MESSAGE_BYTES:
            key = next(iter(remote.due))
            del remote.due[key]
            entry = remote.wants.get(key)
            if entry is None:
                continue
            block = self._read(entry.cid)
            if block is None:  # kept: stored() sends it if it arrives while still wanted
                if entry.send_dont_have:
                    message.presences.append((entry.cid, DONT_HAVE))
            elif entry.want_type == WANT_BLOCK or len(block) <= HAVE_AS_BLOCK:
                message.blocks.append((entry.cid, block))
                size += len(block)
                del remote.wants[key]
            else:
                message.presences.append((entry.cid, HAVE))
                del remote.wants[key]
        return message if message else None

    def _read(self, cid: CID) -> bytes | None:
        if self.store is None:
            return None
        name = str(cid)
        try:
            return self.store.get(name) if self.store.has(name) else None
        except CommonsError:  # rotted on disk (the store just dropped it) or vanished meanwhile
            return None

    async def _send(self, remote: _Remote, message: Message) -> None:
        for attempt in range(2):  # a stream the peer closed meanwhile is reopened once
            if remote.stream is None:
                with trio.fail_after(hostlib.CONNECT_TIMEOUT):
                    remote.stream = await self.host.new_stream(remote.peer_id, PROTOCOLS)
                remote.protocol = str(remote.stream.get_protocol())
            try:
                await remote.stream.write(frame(message.encode(remote.protocol)))
                break
            except STREAM_ERRORS:
                remote.stream = None
                if attempt:
                    raise
        self.blocks_sent += len(message.blocks)
        if self.pacer is not None and message.blocks:
            await self.pacer.pace(sum(len(block) for _, block in message.blocks))

    def _forget(self, remote: _Remote) -> None:
        if self.remotes.get(remote.peer_id) is remote:
            del self.remotes[remote.peer_id]
        self._refused_by(remote.peer_id)

    def _lied(self, peer_id: ID) -> None:
        _bounded_put(self.liars, peer_id, LIAR)
        self._refused_by(peer_id)

    def _refused_by(self, peer_id: ID) -> None:
        for want in self.wants.values():
            if peer_id in want.asked:
                want.refused.add(peer_id)
                want.changed()

    # -- fetching
    async def get(self, cid: CID, peers: Sequence[ID], stall_s: float = STALL_S,
                  failed: dict[ID, str] | None = None) -> bytes | None:
        """The block from the first of `peers` (asked in turn) that sends it; None when each said
        dont-have, dropped us or stayed silent for `stall_s`. The block is not stored here.

        With `failed` (peer -> why), peers in it are skipped and those that drop us, lie or stall are
        added to it: one DAG fetch asks a dead or hung peer once, not once per block."""
        failed = {} if failed is None else failed
        key = cid.digest
        want = self.wants.setdefault(key, _Want(cid))
        want.waiters += 1
        try:
            for peer_id in peers:
                if want.block is not None:
                    break
                if peer_id in self.liars:
                    failed[peer_id] = self.liars[peer_id]
                if peer_id in want.refused or peer_id in failed:
                    continue
                if peer_id not in want.asked:
                    want.asked.add(peer_id)
                    self._queue(peer_id, Entry(cid, WANT_BLOCK, send_dont_have=True))
                with trio.move_on_after(stall_s) as stalled:
                    while want.block is None and peer_id not in want.refused:
                        await want.news.wait()
                why = self.liars.get(peer_id) or self.gone.get(peer_id)
                if want.block is None and (why or stalled.cancelled_caught):
                    failed.setdefault(peer_id, why or f"no answer in {stall_s:g}s")
            return want.block
        finally:
            want.waiters -= 1
            if want.waiters == 0:
                del self.wants[key]
                self.recent[key] = None
                while len(self.recent) > RECENT:
                    self.recent.popitem(last=False)
                for peer_id in want.asked - want.refused - {want.sender}:
                    if peer_id in self.remotes:
                        self._queue(peer_id, Entry(cid, cancel=True))

    def _queue(self, peer_id: ID, entry: Entry) -> None:
        remote = self._remote(peer_id)
        remote.outgoing[entry.cid.digest] = entry
        remote.wake.set()


def _bounded_put(table: dict[ID, str], peer_id: ID, why: str) -> None:
    table.pop(peer_id, None)
    table[peer_id] = why
    while len(table) > REMEMBERED:
        del table[next(iter(table))]


async def _close(remote: _Remote) -> None:
    stream, remote.stream = remote.stream, None
    if stream is not None:
        with trio.move_on_after(1):
            try:
                await stream.close()
            except STREAM_ERRORS:
                pass


@asynccontextmanager
async def open_bitswap(host: IHost, store=None, pacer: Pacer | None = None) -> AsyncIterator[Bitswap]:
    """Registers bitswap on `host` (before `host.run`, so identify lists it) and runs its senders."""
    swap = Bitswap(host, store, pacer)
    for protocol in PROTOCOLS:
        host.set_stream_handler(protocol, swap.handle)
    try:
        async with trio.open_nursery() as nursery:
            swap.nursery = nursery
            try:
                yield swap
            finally:
                swap.nursery = None  # a stream arriving now is hung up on
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the senders raise nothing: this is the caller's own error
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


# ---------------------------------------------------------------- a whole DAG


async def fetch_dag_async(
    swap: Bitswap,
    root: str,
    store,
    peers: Sequence[str],
    progress: bool = False,
    on_block: OnBlock | None = None,
    window: int = WINDOW,
    stall_s: float = STALL_S,
) -> FetchReport:
    """Every block of `root` missing from `store`, from `peers` (full multiaddrs), `window` at a time."""
    root = str(CID.decode(root))
    for addr in peers:
        hostlib.peer_info(addr)  # a mistyped address is an error even when nothing needs fetching
    start = time.perf_counter()
    bar = tqdm(desc=f"bitswap {root[:12]}…", unit="blk", leave=False) if progress else None
    job = DagFetch(root, store, on_block, bar)
    try:
        job.discover(root)
        if job.remaining == 0:
            return job.report
        addrs = await _connect(swap.host, peers, job.report.peers_failed)
        ids = list(addrs)
        failed: dict[ID, str] = {}  # peers dropped for the rest of this fetch, and why
        turn = count()

        async def worker() -> None:
            async for cid in job.todo_recv:
                first = next(turn) % len(ids)  # spread blocks over the peers
                block = await swap.get(CID.decode(cid), ids[first:] + ids[:first], stall_s, failed)
                if block is None:
                    job.fail(_no_block(job, cid, failed, ids, stall_s))
                    return
                job.accept(cid, block)
                swap.stored(CID.decode(cid))

        async with trio.open_nursery() as nursery:
            for _ in range(window):
                nursery.start_soon(worker)
            await job.done.wait()
            nursery.cancel_scope.cancel()
        job.report.peers_failed.update({addrs[peer]: why for peer, why in failed.items()})
        if job.error is not None:
            raise job.error
        return job.report
    except BaseExceptionGroup as group:  # on_block's own error (e.g. over budget), not trio's wrapping
        raise unwrap(group) from None
    finally:
        job.report.seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()


def _no_block(job: DagFetch, cid: str, failed: dict[ID, str], ids: list[ID], stall_s: float) -> str:
    """Why a pull stops: every peer failed (it may resume from another), or none has this block."""
    if all(peer in failed for peer in ids):
        kept = job.report.blocks + job.report.already_held
        last = next(reversed(failed.values()))
        return (f"all peers failed with {job.remaining} blocks of {job.root} still missing ({kept} kept; "
                f"last: {last}): pull again from another peer to resume")
    return (f"no peer sent block {cid} of {job.root} (each said it lacks it or was silent for "
            f"{stall_s:g}s): add a peer that seeds it")


async def _connect(host: IHost, peers: Sequence[str], failed: dict[str, str]) -> dict[ID, str]:
    """peer id -> address of those `peers` we could dial (the others land in `failed`); CommonsError
    if none."""
    ids: dict[ID, str] = {}
    for addr in peers:
        try:
            ids.setdefault((await hostlib.connect(host, addr)).peer_id, addr)
        except CommonsError as exc:
            failed[addr] = str(exc)
    if not ids:
        raise CommonsError(f"no peer reachable ({'; '.join(failed.values()) or 'no peers given'})")
    return ids


def fetch_dag(root: str, store, peers: Sequence[str], progress: bool = True, on_block: OnBlock | None = None,
              seed: bytes | None = None) -> FetchReport:
    """Blocking: a short-lived host (throwaway key unless `seed`) pulls the DAG over bitswap, then exits."""

    async def pull(host: IHost) -> FetchReport:
        async with open_bitswap(host) as swap:
            return await fetch_dag_async(swap, root, store, peers, progress=progress, on_block=on_block)

    return run_client(seed, pull)


class BitswapSource:
    """A block source for protocol.content.fetch over bitswap: Kubo, Helia or commons peers.

    One host on its own thread (started at the first call) serves `get_block` from any number of
    threads at once, each call one want in flight; `fetch_dag(root, store, progress, on_block)` is the
    fast path (WINDOW blocks in flight). When no peer could be reached, every later call fails at once
    (get_block: None) instead of dialling again. `close()` (or leaving a `with` block) stops the host.
    """

    def __init__(self, peers: Sequence[str], seed: bytes | None = None, stall_s: float = STALL_S) -> None:
        if not peers:
            raise CommonsError("BitswapSource needs a peer address or more: /ip4/.../tcp/.../p2p/12D3KooW...")
        for addr in peers:
            hostlib.peer_info(addr)
        self.peers = list(peers)
        self.seed = seed
        self.stall_s = stall_s
        self.name = f"bitswap:{self.peers[0]}" + (f" (+{len(self.peers) - 1})" if len(self.peers) > 1 else "")
        self._lock = threading.Lock()
        self._peer: Background | None = None
        self._swap: Bitswap | None = None
        self._ids: list[ID] = []
        self._unreachable: CommonsError | None = None

    def get_block(self, cid: str) -> bytes | None:
        """The block, or None when no peer has it (or none can be reached); not stored here."""
        try:
            return self._started().call(self._swap.get, CID.decode(cid), self._ids, self.stall_s)
        except CommonsError:  # no peer reachable, or the host stopped: the next source is asked
            return None

    def fetch_dag(self, root: str, store, progress: bool = True, on_block: OnBlock | None = None
                  ) -> FetchReport:
        return self._started().call(fetch_dag_async, self._swap, root, store, self.peers, progress,
                                    on_block)

    def close(self) -> None:
        with self._lock:
            if self._peer is not None:
                self._peer.stop()
            self._peer = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _started(self) -> Background:
        with self._lock:
            if self._unreachable is not None:
                raise self._unreachable
            if self._peer is None or not self._peer.alive:
                peer = Background(self._run, name="bitswap")
                try:
                    peer.start()  # re-raises "no peer reachable"
                except CommonsError as exc:
                    self._unreachable = exc
                    raise
                self._peer = peer
            return self._peer

    async def _run(self, ready) -> None:
        host = hostlib.make_host(self.seed)
        listen = hostlib.listen_addrs([hostlib.LOCAL_LISTEN])
        async with open_bitswap(host) as swap, host.run(listen_addrs=listen):
            self._ids = list(await _connect(host, self.peers, {}))
            self._swap = swap
            ready(None)
            await trio.sleep_forever()
