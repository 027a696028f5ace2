"""Bitswap between our own hosts on loopback, and its wire message; Helia is in test_bitswap_helia.py."""

from __future__ import annotations

import filecmp
import hashlib
import os
from pathlib import Path

import pytest
import trio

from protocol.content import fetch
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID, DAG_PB, RAW, cid_for, varint_decode
from protocol.errors import CommonsError
from protocol.p2p import bitswap
from protocol.p2p.background import Background
from protocol.p2p.bitswap_message import (
    BITSWAP_100,
    BITSWAP_110,
    BITSWAP_120,
    DONT_HAVE,
    HAVE,
    WANT_HAVE,
    Entry,
    Message,
    MessageError,
)
from protocol.p2p.exchange import run_client
from protocol.p2p.node import open_node

SIZE = 1_300_000  # five 256 KiB leaves under one node


@pytest.fixture
def tree(tmp_path) -> Path:
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(os.urandom(SIZE))
    (folder / "sub" / "config.json").write_text('{"r": 8}')
    return folder


def _seeding(store: BlockStore) -> Background:
    """A node serving `store` on its own thread; `.start()` returns its addresses."""

    async def run(ready) -> None:
        async with open_node(store) as node:
            ready(node.addrs)
            await trio.sleep_forever()

    return Background(run)


# ---------------------------------------------------------------- the message


def test_a_message_survives_encoding_and_older_versions_drop_what_they_lack() -> None:
    block = b"hello"
    cid = cid_for(RAW, block)
    wants = [Entry(cid, send_dont_have=True), Entry(cid, WANT_HAVE), Entry(cid, cancel=True)]
    presences = [(cid, DONT_HAVE), (cid, HAVE)]
    message = Message(wantlist=wants, full=True, blocks=[(cid, block)], presences=presences)

    newest = Message.decode(message.encode(BITSWAP_120))
    middle = Message.decode(message.encode(BITSWAP_110))
    oldest = Message.decode(Message(blocks=[(CID(0, DAG_PB, cid.digest), block)]).encode(BITSWAP_100))

    assert newest == message
    assert [e.want_type for e in middle.wantlist] == [0, 0]  # 1.1.0 has no want-have...
    assert middle.presences == [] and middle.blocks == [(cid, block)]  # ...nor presences
    assert oldest.blocks == [(CID(0, DAG_PB, cid.digest), block)]


def test_a_received_block_is_named_by_its_own_bytes_not_by_the_sender() -> None:
    wanted = cid_for(RAW, b"the real block")
    forged = Message(blocks=[(wanted, b"something else")]).encode()

    (cid, _data), = Message.decode(forged).blocks

    assert cid != wanted and cid.digest == hashlib.sha256(b"something else").digest()


def test_a_message_that_is_not_protobuf_is_refused() -> None:
    with pytest.raises(MessageError, match="malformed bitswap message"):
        Message.decode(b"\x0a\x05\x0a\x03")  # a wantlist entry longer than the message


# ---------------------------------------------------------------- serving


class _Wire:
    """A host whose only stream records the messages written to it."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def set_stream_handler(self, *_args) -> None:
        pass

    async def new_stream(self, _peer, protocols):
        wire = self

        class Stream:
            def get_protocol(self) -> str:
                return protocols[0]

            async def write(self, data: bytes) -> None:
                wire.sent.append(Message.decode(_unframe(data)))

            async def close(self) -> None:
                pass

        return Stream()


def _unframe(data: bytes) -> bytes:
    size, start = varint_decode(data)
    assert start + size == len(data)
    return data[start:]


def test_each_want_gets_the_answer_its_type_and_flags_ask_for(tmp_path) -> None:
    store = BlockStore(tmp_path)
    held = {name: os.urandom(4096) for name in ("block", "have")} | {"tiny": b"tiny"}
    cids = {name: cid_for(RAW, data) for name, data in held.items()}
    for name, data in held.items():
        store.put(str(cids[name]), data)
    absent = cid_for(RAW, b"absent")
    later = cid_for(RAW, b"later")
    wire = _Wire()

    async def main() -> None:
        async with bitswap.open_bitswap(wire, store) as swap:
            swap.received("peer", Message(wantlist=[
                Entry(cids["block"]),                  # want-block: the block
                Entry(cids["have"], WANT_HAVE),        # want-have: a presence
                Entry(cids["tiny"], WANT_HAVE),        # want-have of a tiny block: the block itself
                Entry(absent, send_dont_have=True),    # missing, asked to say so: dont-have
                Entry(later),                          # missing, silent: kept until we hold it
            ]))
            await trio.sleep(0.1)
            store.put(str(later), b"later")
            swap.stored(later)
            await trio.sleep(0.1)

    trio.run(main)

    first, second = wire.sent
    assert first.blocks == [(cids["block"], held["block"]), (cids["tiny"], b"tiny")]
    assert first.presences == [(cids["have"], HAVE), (absent, DONT_HAVE)]
    assert second.blocks == [(later, b"later")] and second.presences == []


# ---------------------------------------------------------------- fetching from our own nodes


def test_one_commons_node_pulls_a_folder_from_another_over_bitswap(tree, tmp_path) -> None:
    seed_store = BlockStore(tmp_path / "seed")
    root = seed_store.add_path(tree)
    seeder = _seeding(seed_store)
    addrs = seeder.start()
    try:
        report = bitswap.fetch_dag(root, BlockStore(tmp_path / "pull"), addrs, progress=False)
    finally:
        seeder.stop()

    BlockStore(tmp_path / "pull").export(root, tmp_path / "out")
    assert report.blocks == len(list(seed_store.dag(root)))
    assert filecmp.cmp(tree / "weights.bin", tmp_path / "out" / "weights.bin", shallow=False)
    assert (tmp_path / "out" / "sub" / "config.json").read_text() == '{"r": 8}'


def test_a_bitswap_block_source_feeds_protocol_content_fetch(tree, tmp_path) -> None:
    seed_store = BlockStore(tmp_path / "seed")
    root = seed_store.add_path(tree, cid_version=1)  # raw leaves, CIDv1
    seeder = _seeding(seed_store)
    addrs = seeder.start()
    try:
        with bitswap.BitswapSource(addrs) as source:
            fetched = fetch.fetch_dag(root, BlockStore(tmp_path / "pull"), [source], progress=False)
            nobody_has = source.get_block(str(cid_for(RAW, b"no one has this")))
    finally:
        seeder.stop()

    assert fetched == len(list(seed_store.dag(root)))
    assert nobody_has is None


def test_a_pull_takes_each_block_from_whichever_peer_has_it(tree, tmp_path) -> None:
    full = BlockStore(tmp_path / "full")
    root = full.add_path(tree)
    partial = BlockStore(tmp_path / "partial")
    for cid, block in list(full.dag(root))[:3]:  # the folders and the first file node only
        partial.put(cid, block)
    seeders = [_seeding(partial), _seeding(full)]
    addrs = [addr for seeder in seeders for addr in seeder.start()]
    try:
        report = bitswap.fetch_dag(root, BlockStore(tmp_path / "pull"), addrs, progress=False)
    finally:
        for seeder in seeders:
            seeder.stop()

    assert report.blocks == len(list(full.dag(root)))


def test_a_block_no_peer_has_fails_the_pull_in_one_line(tmp_path) -> None:
    missing = str(cid_for(RAW, b"nobody seeds this"))
    seeder = _seeding(BlockStore(tmp_path / "empty"))
    addrs = seeder.start()
    try:
        with pytest.raises(CommonsError, match="no peer sent block .* add a peer that seeds it"):
            run_client(None, lambda host: _pull(host, missing, tmp_path, addrs))
    finally:
        seeder.stop()


async def _pull(host, root: str, tmp_path: Path, addrs: list[str]):
    async with bitswap.open_bitswap(host) as swap:
        return await bitswap.fetch_dag_async(swap, root, BlockStore(tmp_path / "pull"), addrs, stall_s=5)
