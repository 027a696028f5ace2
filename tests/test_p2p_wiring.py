"""The network wired end to end on loopback: an index with a libp2p host ingests signed announcements.

One index process (`commons index serve --p2p-listen`) serves the module; a publisher process announces
with `commons publish --announce`; a fresh developer home pulls by NAME over the index's HTTP API after
the publisher has exited. Forged, tampered, squatting and replayed announcements come from an
in-process peer and must leave the index unchanged.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio
from click.testing import CliRunner
from live_index import IndexProcess
from safetensors.numpy import save_file

from commons.cli import cli
from commons.publish import meta_from_folder
from protocol.content.blockstore import BlockStore
from protocol.errors import CommonsError
from protocol.p2p.announce import TOPIC_ADAPTERS, AdapterAnnouncement, sign
from protocol.p2p.announcer import wait_for_subscribers
from protocol.p2p.node import open_node
from protocol.signing.keys import Identity
from protocol.signing.manifest import SIGNATURE_FILE, sign_directory

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from commons.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(folder: Path, size: int = 600_000) -> Path:
    """A PEFT-shaped folder: a config and a multi-block weights file (3 chunks)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 8, "lora_alpha": 16,
         "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}))
    weights = np.random.default_rng().standard_normal((size // 32, 8), dtype=np.float32)
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": weights},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    started = IndexProcess(tmp_path_factory.mktemp("index-home"))
    yield started
    started.stop()


def test_publish_announce_index_ingests_and_a_fresh_home_pulls_by_name(tmp_path, index, monkeypatch):
    folder = make_adapter(tmp_path / "adapter")
    publisher = tmp_path / "publisher"
    start = time.monotonic()
    done = subprocess.run(
        [*CLI, "publish", str(folder), "--name", "wire-lora", "--license", "Apache-2.0", "--announce",
         "--bootstrap", index.addr, "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--seed-seconds", "40", "--json"],
        cwd=ROOT, env={**os.environ, "COMMONS_HOME": str(publisher)}, capture_output=True, timeout=90,
        check=False)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    out = json.loads(done.stdout)
    # The publisher stopped seeding because the index re-announced the CID, not because time ran out.
    assert out["announce"]["confirmed_by"] == [index.peer_id], out
    assert out["announce"]["seconds"] < 40 and elapsed < 40
    print(f"publish + announce + index fetch + confirmation: {elapsed:.1f}s "
          f"(seeding {out['announce']['seconds']}s)")

    stats = index.p2p()
    assert stats["ingested"] >= 1 and stats["blocks_fetched"] >= 4
    resolved = httpx.get(f"{index.url}/api/resolve/wire-lora", timeout=5).json()
    assert resolved["cid"] == out["cid"] and resolved["version"] == 1
    assert BlockStore(index.home / "blocks").missing(out["cid"]) == []

    # Announcing it again later (its author, from the local index): the index already holds it and says so.
    monkeypatch.setenv("COMMONS_HOME", str(publisher))
    again = CliRunner().invoke(cli, ["p2p", "announce", "wire-lora", "--bootstrap", index.addr, "--listen",
                                     "/ip4/127.0.0.1/tcp/0", "--seed-seconds", "30", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["confirmed_by"] == [index.peer_id]
    assert index.p2p()["known"] >= 1

    # A developer who never saw the publisher: only the index URL; the publisher process is gone.
    from commons.pull import pull

    monkeypatch.setenv("COMMONS_HOME", str(tmp_path / "developer"))
    pulled = pull("wire-lora", out=tmp_path / "pulled", index_url=index.url, progress=False)
    assert pulled.cid == out["cid"] and pulled.verified.meta.name == "wire-lora"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "pulled" / name).read_bytes() == (folder / name).read_bytes()


def test_unreachable_peer_is_one_line_error_and_p2p_announce_recovers(tmp_path, index, monkeypatch):
    folder = make_adapter(tmp_path / "adapter", size=1000)
    home = tmp_path / "h"
    dead = f"/ip4/127.0.0.1/tcp/{_free_port()}/p2p/{Identity.generate().peer_id()}"
    done = subprocess.run([*CLI, "publish", str(folder), "--name", "lonely", "--license", "MIT",
                           "--bootstrap", dead, "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--seed-seconds",
                           "5"],
                          cwd=ROOT, env={**os.environ, "COMMONS_HOME": str(home)}, capture_output=True,
                          timeout=60, check=False)
    err = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1, err
    assert err[-1].startswith("error: lonely v1 is published locally but not announced: "
                              "no peer reachable"), err
    assert "commons p2p announce lonely@1" in err[-1] and "Traceback" not in done.stderr.decode()

    monkeypatch.setenv("COMMONS_HOME", str(home))
    result = CliRunner().invoke(cli, ["p2p", "announce", "lonely@1", "--bootstrap", index.addr, "--listen",
                                      "/ip4/127.0.0.1/tcp/0", "--seed-seconds", "30", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["confirmed_by"] == [index.peer_id] and report["seconds"] < 30
    assert httpx.get(f"{index.url}/api/resolve/lonely", timeout=5).json()["cid"] == report["cid"]


def test_a_seeding_node_in_the_background_is_counted_live_by_the_index(tmp_path, index):
    from protocol.p2p.background import Background
    from protocol.p2p.service import serve

    live = httpx.get(f"{index.url}/api/stats", timeout=5).json()["live_nodes"]
    key = tmp_path / "node.key"
    node = Identity.load_or_create(key)
    seeder = Background(lambda ready: serve(BlockStore(tmp_path / "s"), (), ["/ip4/127.0.0.1/tcp/0"], key,
                                            [index.addr], on_ready=ready, capability="train"))
    info = seeder.start()
    try:
        assert info["peer_id"] == node.peer_id() and info["bootstrap_errors"] == {}
        index.wait(lambda s: any(r["outcome"] == "presence" and r["signer"] == node.public_hex
                                 for r in s["recent"]))
        assert httpx.get(f"{index.url}/api/stats", timeout=5).json()["live_nodes"] == live + 1
    finally:
        seeder.stop()
    assert not seeder.alive


def _tampered(envelope: bytes) -> str:
    """The same bundle with its signed statement edited (licence swapped): the signature breaks."""
    env = json.loads(envelope)
    inner = env["dsseEnvelope"]
    statement = base64.b64decode(inner["payload"]).replace(b"Apache-2.0", b"MIT")
    tampered = {**inner, "payload": base64.b64encode(statement).decode()}
    return json.dumps({**env, "dsseEnvelope": tampered}, sort_keys=True, separators=(",", ":"))


def test_forged_tampered_squatting_and_replayed_announcements_are_dropped(tmp_path, index):
    alice, mallory = Identity.generate(), Identity.generate()
    store = BlockStore(tmp_path / "store")

    def signed_folder(name: str, who: Identity, license_: str = "Apache-2.0") -> tuple[str, bytes]:
        folder = make_adapter(tmp_path / f"{name}-{who.public_hex[:6]}", size=300_000)
        sign_directory(folder, meta_from_folder(folder, name, license_, version=1, previous=None), who)
        return store.add_path(folder), (folder / SIGNATURE_FILE).read_bytes()

    good_cid, good_env = signed_folder("alice-lora", alice)
    squat_cid, squat_env = signed_folder("alice-lora", mallory)  # mallory's key, alice's name
    other_cid, other_env = signed_folder("alice-two", alice)
    before = index.p2p()

    def count(stats: dict, key: str) -> int:
        return stats["dropped"].get(key, 0)

    async def main() -> None:
        async with open_node(store, mallory, ["/ip4/127.0.0.1/tcp/0"], [index.addr], gossip=True) as node:
            pubsub = node.gossip.pubsub
            pubsub.remove_topic_validator(TOPIC_ADAPTERS)  # so our forgeries leave this node at all
            assert await wait_for_subscribers(node, TOPIC_ADAPTERS)
            good = sign(AdapterAnnouncement(good_cid, "alice-lora", 1, good_env.decode(), node.addrs), alice)
            await pubsub.publish(TOPIC_ADAPTERS, good)  # alice's, relayed by mallory's node: fine
            await trio.to_thread.run_sync(index.wait, lambda s: s["ingested"] == before["ingested"] + 1)

            await pubsub.publish(TOPIC_ADAPTERS, good)  # replay of the same signed bytes
            forged = json.loads(good)
            forged["body"]["cid"] = squat_cid  # edited in transit: alice's signature no longer covers it
            await pubsub.publish(TOPIC_ADAPTERS, json.dumps(forged).encode())
            impostor = json.loads(sign(AdapterAnnouncement(squat_cid, "alice-lora", 2, squat_env.decode(),
                                                           node.addrs), mallory))
            impostor["signer"] = alice.public_hex  # claims alice's key with mallory's signature
            await pubsub.publish(TOPIC_ADAPTERS, json.dumps(impostor).encode())
            await node.gossip.publish(AdapterAnnouncement(squat_cid, "alice-lora", 1, squat_env.decode(),
                                                          node.addrs))  # signed, but not her name
            await node.gossip.publish(AdapterAnnouncement(other_cid, "alice-two", 1, _tampered(other_env),
                                                          node.addrs))
            await trio.to_thread.run_sync(index.wait,
                                          lambda s: count(s, "rejected") >= count(before, "rejected") + 2
                                          and count(s, "invalid") >= count(before, "invalid") + 2
                                          and count(s, "replayed") >= count(before, "replayed") + 1)

    trio.run(main)
    after = index.p2p()
    assert after["ingested"] == before["ingested"] + 1
    assert count(after, "replayed") == count(before, "replayed") + 1
    assert count(after, "invalid") == count(before, "invalid") + 2
    assert count(after, "rejected") == count(before, "rejected") + 2
    details = " | ".join(r["detail"] for r in after["recent"] if r["outcome"] == "rejected")
    assert "belongs to another signer" in details and "signature" in details, details
    resolved = httpx.get(f"{index.url}/api/resolve/alice-lora", timeout=5).json()
    assert resolved["cid"] == good_cid and resolved["signer"] == alice.public_hex
    assert httpx.get(f"{index.url}/api/resolve/alice-two", timeout=5).status_code == 404
    assert httpx.get(f"{index.url}/ipfs/{squat_cid}?format=raw", timeout=5).status_code == 404


def test_without_the_index_http_api_names_resolve_over_libp2p(tmp_path, index, monkeypatch):
    """A seeder that only heard the announcement, and the index's libp2p host, both answer NAME → CID."""
    from commons.pull import pull
    from protocol.p2p.background import Background
    from protocol.p2p.resolve import resolve_name
    from protocol.p2p.service import serve

    Identity.load_or_create(tmp_path / "s.key")
    seeder = Background(lambda ready: serve(BlockStore(tmp_path / "s"), (), ["/ip4/127.0.0.1/tcp/0"],
                                            tmp_path / "s.key", [index.addr], on_ready=ready))
    seeder_addr = seeder.start()["addrs"][0]
    try:
        folder = make_adapter(tmp_path / "adapter", size=300_000)
        done = subprocess.run(
            [*CLI, "publish", str(folder), "--name", "echo-lora", "--license", "MIT", "--bootstrap",
             index.addr, "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--seed-seconds", "30", "--json"],
            cwd=ROOT, env={**os.environ, "COMMONS_HOME": str(tmp_path / "publisher")}, capture_output=True,
            timeout=60, check=False)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        cid = json.loads(done.stdout)["cid"]
        deadline = time.monotonic() + 15
        while True:  # the announcement reaches the seeder through the index's gossip mesh
            try:
                heard = resolve_name([seeder_addr], "echo-lora", None)
                break
            except CommonsError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert heard.cid == cid and heard.verified.meta.version == 1
        with pytest.raises(CommonsError, match="does not know nobody-lora"):
            resolve_name([seeder_addr], "nobody-lora", None)
    finally:
        seeder.stop()

    developer = tmp_path / "developer"
    developer.mkdir()
    (developer / "config.toml").write_text(f'peers = ["{index.addr}"]\n')
    monkeypatch.setenv("COMMONS_HOME", str(developer))
    dead = f"http://127.0.0.1:{_free_port()}"
    pulled = pull("echo-lora@1", out=tmp_path / "pulled", index_url=dead, progress=False)
    assert pulled.cid == cid
    weights = "adapter_model.safetensors"
    assert (tmp_path / "pulled" / weights).read_bytes() == (folder / weights).read_bytes()


def test_resolve_answers_and_flags_are_checked(tmp_path, monkeypatch):
    from protocol.errors import VerifyError
    from protocol.p2p.announce import canonical
    from protocol.p2p.resolve import check_answer

    folder = make_adapter(tmp_path / "adapter", size=1000)
    sign_directory(folder, meta_from_folder(folder, "real-lora", "MIT", version=2, previous=None),
                   Identity.generate())
    cid = BlockStore(tmp_path / "s").add_path(folder)
    answer = canonical({"cid": cid, "envelope": (folder / SIGNATURE_FILE).read_text()})
    assert check_answer(answer, "real-lora", 2)[0] == cid
    with pytest.raises(VerifyError, match="asked for other-lora@None, the answer signs real-lora@2"):
        check_answer(answer, "other-lora", None)  # a peer answering with some other signed adapter
    with pytest.raises(VerifyError, match="asked for real-lora@1"):
        check_answer(answer, "real-lora", 1)
    with pytest.raises(VerifyError, match="malformed"):
        check_answer(b'{"cid": "nope"}', "real-lora", None)

    runner = CliRunner()
    monkeypatch.setenv("COMMONS_HOME", str(tmp_path / "home"))
    with pytest.raises(CommonsError, match="--bootstrap needs --p2p-listen"):
        runner.invoke(cli, ["index", "serve", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"],
                      catch_exceptions=False)
    with pytest.raises(CommonsError, match="--announce needs a peer: pass --bootstrap"):
        runner.invoke(cli, ["publish", str(folder), "--name", "real-lora", "--license", "MIT", "--announce"],
                      catch_exceptions=False)


def test_the_cli_default_p2p_port_is_the_hosts() -> None:
    from commons.cli import p2p
    from protocol.p2p.host import DEFAULT_PORT

    assert p2p.DEFAULT_PORT == DEFAULT_PORT


def test_the_index_relays_for_a_seeder_behind_a_nat(tmp_path, index):
    """A volunteer behind a NAT (`commons node start --seed --reserve INDEX`) reserves a circuit at the
    index's own peer; a puller that dials only that circuit address gets the blocks."""
    from protocol.p2p.background import Background
    from protocol.p2p.bitswap import fetch_dag_async
    from protocol.p2p.relay import circuit_addr
    from protocol.p2p.service import serve

    Identity.load_or_create(tmp_path / "node.key")
    store = BlockStore(tmp_path / "seeder")
    root = store.add_path(make_adapter(tmp_path / "adapter", size=300_000))
    seeder = Background(lambda ready: serve(store, (), ["/ip4/127.0.0.1/tcp/0"], tmp_path / "node.key",
                                            [index.addr], on_ready=ready, capability="train",
                                            reserve=[index.addr]), name="nat-seeder")
    info = seeder.start()
    try:
        circuit = circuit_addr(index.addr, info["peer_id"])
        assert info["circuit_addrs"] == [circuit] and info["relay_errors"] == {}

        async def pull():
            async with open_node(BlockStore(tmp_path / "puller")) as puller:
                return await fetch_dag_async(puller.bitswap, root, puller.store, [circuit])

        report = trio.run(pull)
        assert report.root == root and report.peers_failed == {}
        # its presence carried the circuit: the index's router now gives pullers that way in
        relayed = circuit.removesuffix(f"/p2p/{info['peer_id']}")
        url = f"{index.url}/routing/v1/peers/{info['peer_id']}"
        deadline = time.monotonic() + 20
        while relayed not in httpx.get(url, timeout=5).text and time.monotonic() < deadline:
            time.sleep(0.3)
        assert relayed in httpx.get(url, timeout=5).text
    finally:
        seeder.stop()
    BlockStore(tmp_path / "puller").export(root, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()


def test_reserve_without_seed_names_the_flag(tmp_path) -> None:
    env = {**os.environ, "COMMONS_HOME": str(tmp_path)}
    done = subprocess.run([*CLI, "node", "start", "--coordinator", "127.0.0.1:9", "--reserve",
                           "/ip4/127.0.0.1/tcp/4051/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 1 and "add --seed" in done.stderr and "Traceback" not in done.stderr
