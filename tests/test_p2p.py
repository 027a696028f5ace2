"""Real libp2p hosts on loopback: seeding processes, bitswap pulls, fail-over, rate limits, bad peers,
signed gossip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from processes import first_line

from protocol.content.blockstore import BlockStore
from protocol.content.unixfs import file_cid as unixfs_cid
from protocol.errors import CommonsError, VerifyError
from protocol.p2p import bitswap
from protocol.p2p import host as hostlib
from protocol.p2p.announce import (
    TOPIC_ADAPTERS,
    TOPIC_PRESENCE,
    AdapterAnnouncement,
    Checker,
    PresenceAnnouncement,
    sign,
)
from protocol.p2p.exchange import FetchReport, run_client
from protocol.p2p.node import open_node
from protocol.signing.keys import Identity

ROOT = Path(__file__).resolve().parents[1]
SIZE = 5 * 1024 * 1024 + 12345  # 21 leaves: a two-level balanced DAG, last chunk partial


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("payload") / "adapter.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture(autouse=True)
def commons_home(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMONS_HOME", str(tmp_path / "home"))


class Seeder:
    """`python -m protocol.p2p serve` in its own process (so it can be killed -9)."""

    def __init__(self, tmp: Path, add: Path, rate_limit: float | None = None) -> None:
        cmd = [sys.executable, "-m", "protocol.p2p", "serve", "--store", str(tmp / "store"), "--add",
               str(add), "--listen", "/ip4/127.0.0.1/tcp/0"]
        if rate_limit:
            cmd += ["--rate-limit", str(rate_limit)]
        env = {**os.environ, "COMMONS_HOME": str(tmp / "home")}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.info = json.loads(first_line(self.proc, "seeder", 30))
        self.addr = self.info["addrs"][0]
        self.root = self.info["roots"][0]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)




@pytest.fixture
def seeders(tmp_path, payload):
    started: list[Seeder] = []

    def start(name: str, rate_limit: float | None = None) -> Seeder:
        seeder = Seeder(tmp_path / name, payload, rate_limit)
        started.append(seeder)
        return seeder

    yield start
    for seeder in started:
        seeder.kill()


def test_publish_on_a_pull_on_b(tmp_path, payload, seeders):
    a = seeders("a")
    ours = BlockStore(tmp_path / "ref").add_path(payload)
    assert a.root == ours  # the seeder's CID is the Kubo-identical one we compute

    store = BlockStore(tmp_path / "b")
    report = bitswap.fetch_dag(a.root, store, [a.addr], progress=False)
    assert report.blocks == 22 and report.bytes > SIZE
    store.export(a.root, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == payload.read_bytes()

    again = bitswap.fetch_dag(a.root, store, [a.addr], progress=False)
    assert again.blocks == 0 and again.already_held == 22  # nothing fetched twice

    # the block-source interface protocol.content.fetch consumes
    with bitswap.BitswapSource([a.addr]) as source:
        assert source.name.startswith("bitswap:/ip4/127.0.0.1/")
        assert source.get_block(a.root) == store.get(a.root)
        assert source.get_block(unixfs_cid(b"nobody has this")) is None
        copy = BlockStore(tmp_path / "c")
        assert source.fetch_dag(a.root, copy, progress=False).blocks == 22


def test_seeder_killed_mid_transfer_pull_fails_over_to_c(tmp_path, payload, seeders):
    a, c = seeders("a", rate_limit=2e6), seeders("c", rate_limit=2e6)
    store = BlockStore(tmp_path / "b")
    got: list[str] = []

    def on_block(cid: str, size: int) -> None:
        got.append(cid)
        if len(got) == 4:
            a.kill()

    report = bitswap.fetch_dag(a.root, store, [a.addr, c.addr], progress=False, on_block=on_block)
    assert a.proc.returncode == -signal.SIGKILL
    assert a.addr in report.peers_failed
    assert report.blocks == 22 and len(set(got)) == 22  # every block exactly once: nothing lost or refetched
    store.export(a.root, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == payload.read_bytes()


def test_only_peer_killed_then_resume_from_c(tmp_path, payload, seeders):
    a = seeders("a", rate_limit=3e6)
    store = BlockStore(tmp_path / "b")
    got: list[str] = []

    def on_block(cid: str, size: int) -> None:
        got.append(cid)
        if len(got) == 6:
            a.kill()

    with pytest.raises(CommonsError, match=r"all peers failed .* pull again from another peer to resume"):
        bitswap.fetch_dag(a.root, store, [a.addr], progress=False, on_block=on_block)
    assert all(store.has(cid) for cid in got)  # what arrived is kept

    c = seeders("c")
    report = bitswap.fetch_dag(c.root, store, [c.addr], progress=False)
    assert report.already_held == len(got) and report.blocks == 22 - len(got)
    store.export(c.root, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == payload.read_bytes()


class CorruptingStore:
    """Serves every block with its last byte flipped: a lying peer."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store

    def has(self, cid: str) -> bool:
        return self.store.has(cid)

    def get(self, cid: str) -> bytes:
        block = self.store.get(cid)
        return block[:-1] + bytes([block[-1] ^ 1])


def _run_with_servers(stores: list, puller_store: BlockStore, root: str) -> FetchReport:
    async def pull(client) -> FetchReport:
        async with open_node(stores[0]) as first, open_node(stores[-1]) as second, \
                bitswap.open_bitswap(client) as swap:
            peers = [first.addrs[0]] + ([second.addrs[0]] if len(stores) > 1 else [])
            return await bitswap.fetch_dag_async(swap, root, puller_store, peers)

    return run_client(None, pull)


def test_corrupt_block_is_refused_and_the_liar_dropped(tmp_path, payload):
    good = BlockStore(tmp_path / "good")
    root = good.add_path(payload)
    liar = CorruptingStore(good)

    with pytest.raises(CommonsError, match="all peers failed .*hashes to no CID asked for"):
        _run_with_servers([liar], BlockStore(tmp_path / "b1"), root)
    assert not any((tmp_path / "b1").rglob("*/*"))  # nothing it sent was stored

    store = BlockStore(tmp_path / "b2")
    report = _run_with_servers([liar, good], store, root)
    assert any("hashes to no CID asked for" in why for why in report.peers_failed.values())
    store.export(root, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == payload.read_bytes()


def test_pull_a_directory_tree(tmp_path):
    src = tmp_path / "adapter"
    (src / "nested").mkdir(parents=True)
    (src / "adapter_model.safetensors").write_bytes(os.urandom(600_000))
    (src / "nested" / "README.md").write_text("# math-lora")
    (src / "empty.txt").write_bytes(b"")
    seeder = BlockStore(tmp_path / "seed")
    root = seeder.add_path(src)
    store = BlockStore(tmp_path / "b")
    report = _run_with_servers([seeder], store, root)
    assert report.blocks == len(list(seeder.dag(root)))
    store.export(root, tmp_path / "out")
    for path in src.rglob("*"):
        twin = tmp_path / "out" / path.relative_to(src)
        assert twin.is_dir() if path.is_dir() else twin.read_bytes() == path.read_bytes()


def test_a_hung_peer_is_dropped_after_the_stall_timeout(tmp_path, payload):
    good = BlockStore(tmp_path / "good")
    root = good.add_path(payload)

    async def never_answer(stream) -> None:
        await trio.sleep_forever()

    async def pull(client) -> FetchReport:
        async with open_node(good) as seeder, open_node(BlockStore(tmp_path / "x")) as hung, \
                bitswap.open_bitswap(client) as swap:
            for protocol in bitswap.PROTOCOLS:
                hung.host.set_stream_handler(protocol, never_answer)
            return await bitswap.fetch_dag_async(swap, root, BlockStore(tmp_path / "b"),
                                                 [hung.addrs[0], seeder.addrs[0]], stall_s=1.0)

    report = run_client(None, pull)
    assert report.blocks == 22
    assert list(report.peers_failed.values()) == ["no answer in 1s"]  # asked once, then left out


def test_peer_without_the_blocks_and_unreachable_peers(tmp_path, payload):
    root = BlockStore(tmp_path / "src").add_path(payload)
    with pytest.raises(CommonsError, match="no peer sent block .* add a peer that seeds it"):
        _run_with_servers([BlockStore(tmp_path / "empty")], BlockStore(tmp_path / "b"), root)

    dead = "/ip4/127.0.0.1/tcp/1/p2p/" + Identity.generate().peer_id()
    with pytest.raises(CommonsError, match="no peer reachable .*cannot reach peer") as err:
        bitswap.fetch_dag(root, BlockStore(tmp_path / "b"), [dead], progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(CommonsError, match="bad peer address 'localhost:4051'"):
        bitswap.fetch_dag(root, BlockStore(tmp_path / "b"), ["localhost:4051"], progress=False)


def test_a_rate_limited_seeder_serves_no_faster_than_its_limit(tmp_path, seeders):
    a = seeders("a", rate_limit=2e6)
    report = bitswap.fetch_dag(a.root, BlockStore(tmp_path / "b"), [a.addr], progress=False)
    # 5.2 MB at 2 MB/s: the pacer holds every byte to the cap but the last message's (≤ 2 MiB)
    assert report.blocks == 22 and report.seconds >= (SIZE - (2 << 20)) / 2e6


def test_mdns_finds_a_peer_on_the_lan(tmp_path):
    async def main() -> bool:
        async with open_node(BlockStore(tmp_path / "a"), listen=["/ip4/0.0.0.0/tcp/0"], mdns=True) as a, \
                open_node(BlockStore(tmp_path / "b"), listen=["/ip4/0.0.0.0/tcp/0"], mdns=True) as b:
            with trio.move_on_after(20):  # py-libp2p's mDNS takes 1-10 s to answer
                while a.host.get_id() not in b.host.get_connected_peers():
                    await trio.sleep(0.2)
            return a.host.get_id() in b.host.get_connected_peers()

    assert trio.run(main)


def test_host_peer_id_is_the_identity(tmp_path):
    identity = Identity.generate()
    host = hostlib.make_host(hostlib.identity_seed(identity))
    assert host.get_id().to_base58() == identity.peer_id()


# ---------------------------------------------------------------- announcements


def _adapter(cid: str = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG") -> AdapterAnnouncement:
    return AdapterAnnouncement(cid, "math-lora", 3, '{"payload":"..."}', ["/ip4/10.0.0.1/tcp/4051/p2p/x"])


def test_valid_announcement_is_accepted_once():
    me = Identity.generate()
    wire = sign(_adapter(), me)
    checker = Checker()
    signed = checker.check(wire, TOPIC_ADAPTERS)
    assert signed.body == _adapter() and signed.signer == me.public_hex and signed.peer_id == me.peer_id()
    with pytest.raises(VerifyError, match="replayed adapter announcement"):
        checker.check(wire, TOPIC_ADAPTERS)


def test_forged_stale_misplaced_and_malformed_announcements_are_dropped():
    me, mallory = Identity.generate(), Identity.generate()
    wire = json.loads(sign(_adapter(), me))
    tampered = {**wire, "body": {**wire["body"], "cid": "QmPZ9gcCEpqKTo6aq61g2nXGUhM4iCL3ewB6LDXZCtioEB"}}
    with pytest.raises(VerifyError, match="bad signature"):
        Checker().check(json.dumps(tampered).encode(), TOPIC_ADAPTERS)
    impostor = {**wire, "signer": mallory.public_hex}  # claims another key, keeps the old signature
    with pytest.raises(VerifyError, match="bad signature"):
        Checker().check(json.dumps(impostor).encode(), TOPIC_ADAPTERS)
    with pytest.raises(VerifyError, match="stale adapter announcement"):
        Checker().check(sign(_adapter(), me, now=time.time() - 3600), TOPIC_ADAPTERS)
    with pytest.raises(VerifyError, match="arrived on commons/presence/1"):
        Checker().check(sign(_adapter(), me), TOPIC_PRESENCE)
    with pytest.raises(VerifyError, match="signed by another key"):
        Checker().check(sign(PresenceAnnouncement(me.peer_id(), "seed"), mallory), TOPIC_PRESENCE)
    wrong_type = {**wire, "body": {**wire["body"], "version": "3"}}
    with pytest.raises(VerifyError, match="wrong type"):
        Checker().check(json.dumps(wrong_type).encode(), TOPIC_ADAPTERS)
    for junk in (b"not json", b"[]", b'{"signature": "zz"}'):
        with pytest.raises(VerifyError, match="malformed"):
            Checker().check(junk, TOPIC_ADAPTERS)


def test_gossip_delivers_verified_announcements_and_drops_forgeries(tmp_path):
    alice, bob = Identity.generate(), Identity.generate()
    body = _adapter()
    forged = json.loads(sign(body, alice))
    forged["body"]["name"] = "evil-lora"

    async def main() -> tuple[list, dict, list[str]]:
        async with open_node(BlockStore(tmp_path / "a"), alice, gossip=True) as a, \
                open_node(BlockStore(tmp_path / "b"), bob, gossip=True, bootstrap=a.addrs) as b:
            received: list = []
            with trio.fail_after(40):
                async with trio.open_nursery() as nursery:
                    async def listen() -> None:
                        async for signed in b.gossip.messages(TOPIC_ADAPTERS):
                            received.append(signed)
                            if len(received) == 2:
                                nursery.cancel_scope.cancel()

                    nursery.start_soon(listen)
                    await a.gossip.pubsub.subscribe(TOPIC_ADAPTERS)
                    await a.gossip.pubsub.wait_for_subscription(b.host.get_id(), TOPIC_ADAPTERS, 10)
                    # two 1 s heartbeats: b joins a's mesh, so a loaded CI box loses nothing
                    await trio.sleep(2)
                    wire = await a.gossip.publish(body)
                    await a.gossip.pubsub.publish(TOPIC_ADAPTERS, json.dumps(forged).encode())
                    await a.gossip.pubsub.publish(TOPIC_ADAPTERS, wire)  # replay of the same signed bytes
                    await a.gossip.publish(PresenceAnnouncement(a.peer_id, "seed", a.addrs))  # other topic
                    await a.gossip.publish(_adapter("QmPZ9gcCEpqKTo6aq61g2nXGUhM4iCL3ewB6LDXZCtioEB"))
            return received, dict(b.gossip.dropped), b.gossip.providers(body.cid)

    received, dropped, providers = trio.run(main)
    assert [s.body.cid for s in received] == [body.cid, "QmPZ9gcCEpqKTo6aq61g2nXGUhM4iCL3ewB6LDXZCtioEB"]
    assert all(s.signer == alice.public_hex for s in received)
    assert dropped.get("replayed") == 1
    assert providers == body.providers


# ---------------------------------------------------------------- CLI


def test_cli_pull_json_and_errors(tmp_path, payload, seeders):
    from click.testing import CliRunner

    from commons.cli.p2p import p2p_group

    runner = CliRunner()
    for command in ([], ["serve"], ["pull"], ["watch"], ["kubo-push"], ["pin"]):
        assert runner.invoke(p2p_group, [*command, "--help"]).exit_code == 0
    a = seeders("a")
    result = runner.invoke(p2p_group,
                           ["pull", a.root, "--peer", a.addr, "--out", str(tmp_path / "o.bin"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["blocks"] == 22
    assert (tmp_path / "o.bin").read_bytes() == payload.read_bytes()
    bad = runner.invoke(p2p_group, ["pull", a.root, "--peer", "/ip4/127.0.0.1/tcp/4051"])
    assert isinstance(bad.exception, CommonsError) and "bad peer address" in str(bad.exception)
