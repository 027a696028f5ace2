"""The index's write door against a real server: front-running, look-alike names, huge integers, and
rate-limit addresses picked by the client."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from live_index import COMMONS, LiveIndex, directory_entries, directory_node, free_port, serve_index

from index.sample import make_entry, sample_meta
from protocol.content.blockstore import BlockStore
from protocol.signing.keys import Identity


@pytest.fixture
def index(tmp_path: Path):
    with serve_index(tmp_path / "index") as live:
        yield live


def announce(index: LiveIndex, envelope: bytes, cid: str) -> httpx.Response:
    return httpx.post(f"{index.url}/api/announce", json={"envelope": envelope.decode(), "cid": cid},
                      timeout=30)


def resolved(index: LiveIndex, ref: str) -> str | None:
    reply = httpx.get(f"{index.url}/api/resolve/{ref}", timeout=30)
    return reply.json()["cid"] if reply.status_code == 200 else None


def arrive(index: LiveIndex, store: BlockStore, cid: str) -> None:
    """The blocks reach the index (as `commons p2p pull` or `commons car import` there would)."""
    for block_cid, block in store.dag(cid):
        index.store.put(block_cid, block)


# --- 3: front-running ----------------------------------------------------------------------------------


def test_a_front_runner_binds_nothing_and_the_publisher_is_listed(index: LiveIndex, tmp_path: Path) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    mine = BlockStore(tmp_path / "alice")
    envelope, cid = make_entry(tmp_path / "a", sample_meta("alice-lora"), alice, mine)
    # mallory saw model.sig (it is public) and announces it first, with CIDs of her choosing
    _, hers = make_entry(tmp_path / "m", sample_meta("mallory-lora"), mallory, index.store)
    refused = announce(index, envelope, hers)  # a DAG the index holds: it does not carry this envelope
    assert (refused.status_code == 403
            and "differs from the envelope" in refused.json()["detail"]), refused.text
    unknown = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"  # a DAG the index does not hold: it waits
    waiting = announce(index, envelope, unknown)
    assert waiting.status_code == 202 and waiting.json()["status"] == "pending", waiting.text
    assert resolved(index, "alice-lora") is None and resolved(index, "alice-lora@1") is None
    # a re-wrapped copy of alice's own files (one Tsize changed): same envelope, same files, another CID
    arrive(index, mine, cid)
    entries = directory_entries(index.store, cid)
    rewrapped = str(directory_node(index.store, entries))  # live_index writes Tsize 0 where Kubo writes sizes
    assert rewrapped != cid
    copy = announce(index, envelope, rewrapped)
    assert (copy.status_code == 403
            and "is not the DAG `ipfs add -r` makes" in copy.json()["detail"]), copy.text
    # alice announces her own CID: listed, whoever came first
    listed = announce(index, envelope, cid)
    assert listed.status_code == 201 and listed.json()["status"] == "listed", listed.text
    assert resolved(index, "alice-lora") == cid and resolved(index, "alice-lora@1") == cid
    assert announce(index, envelope, unknown).status_code == 409  # the version is bound now, to the right CID


def test_an_announcement_before_its_blocks_is_listed_once_they_arrive(index: LiveIndex,
                                                                      tmp_path: Path) -> None:
    alice = Identity.generate()
    mine = BlockStore(tmp_path / "alice")
    envelope, cid = make_entry(tmp_path / "a", sample_meta("early-bird"), alice, mine)
    assert announce(index, envelope, cid).status_code == 202
    assert resolved(index, "early-bird") is None
    arrive(index, mine, cid)
    assert resolved(index, "early-bird") == cid  # settled on the next look-up
    assert index.db.held("early-bird") == []


# --- 6: look-alike names, huge integers, forwarded addresses -------------------------------------------


def test_names_that_fold_alike_belong_to_their_first_signer(index: LiveIndex, tmp_path: Path) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    envelope, cid = make_entry(tmp_path / "a", sample_meta("My-Model"), alice, index.store)
    assert announce(index, envelope, cid).status_code == 201
    for i, squat in enumerate(["my-model", "my_model", "MY.MODEL", "my--model", "My_.Model"]):
        envelope, cid = make_entry(tmp_path / f"m{i}", sample_meta(squat), mallory, index.store)
        reply = announce(index, envelope, cid)
        assert reply.status_code == 409 and "'My-Model'" in reply.json()["detail"], (squat, reply.text)
        assert resolved(index, squat) is None
    envelope, cid = make_entry(tmp_path / "a2", sample_meta("my_model"), alice, index.store)
    assert announce(index, envelope, cid).status_code == 201  # its owner may


def test_oversized_integers_are_answered_4xx_not_500(index: LiveIndex, tmp_path: Path) -> None:
    envelope, cid = make_entry(tmp_path / "a", sample_meta("numbers"), Identity.generate(), index.store)
    assert announce(index, envelope, cid).status_code == 201
    huge = str(10**30)
    for url in [f"/api/adapters?offset={huge}", f"/api/adapters?max_size={huge}",
                f"/api/adapters/numbers?version={huge}",
                f"/api/resolve/numbers@{huge}", f"/api/resolve/numbers@v{huge}",
                f"/adapters/numbers?version={huge}", f"/datasets/numbers?version={huge}",
                f"/api/adapters?limit={huge}", "/api/resolve/numbers@0"]:
        reply = httpx.get(index.url + url, timeout=30)
        assert 400 <= reply.status_code < 500, (url, reply.status_code, reply.text[:200])


def _serve_cli(home: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([COMMONS, "index", "serve", "--port", str(port), *extra], cwd=home,
                            env={**os.environ, "COMMONS_HOME": str(home)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/stats", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("commons index serve did not start")


def _writes(url: str, count: int) -> list[int]:
    with httpx.Client(timeout=10) as client:  # every write claims another address
        return [client.post(f"{url}/api/announce", json={},
                            headers={"X-Forwarded-For": f"10.0.{i // 250}.{i % 250}"}
                            ).status_code for i in range(count)]


def test_x_forwarded_for_is_believed_only_from_a_proxy_named_with_trust_proxy(tmp_path: Path) -> None:
    proc, url = _serve_cli(tmp_path)
    try:
        codes = _writes(url, 40)
    finally:
        proc.terminate()
        proc.wait(10)
    assert codes[:30] == [422] * 30 and set(codes[30:]) == {429}, codes  # one bucket: the real peer's
    proc, url = _serve_cli(tmp_path, "--trust-proxy", "127.0.0.1")
    try:
        codes = _writes(url, 40)
    finally:
        proc.terminate()
        proc.wait(10)
    assert set(codes) == {422}, codes  # behind a named proxy, each forwarded client has its own bucket
