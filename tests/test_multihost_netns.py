"""Five machines on a private LAN (network namespaces): a campaign survives a volunteer losing its link.

coordinator (SuperLink + ServerApp) ← volunteer-a, volunteer-b (SuperNodes, real Flower processes);
volunteer-b's link is cut while it trains round 1, the round closes on its timeout with volunteer-a's update
alone, round 2 runs, the coordinator signs and publishes. The index host fetches the adapter's blocks from the
coordinator over libp2p (`commons p2p pull`, its own COMMONS_HOME), serves it, and the coordinator announces
it over HTTP; a developer machine then `commons pull`s it by name through that index only. See
docs/multihost.md.

A seeder behind a NAT (its own namespace behind a masquerading router) serves a DAG through a relay's
circuit address, found on the DHT by a puller that knows only the relay, while a direct connection to it
fails (docs/p2p.md "Behind a NAT").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import Lan, lan, netns_unavailable

from commons.demo_task import write_demo_data
from coordinator.campaign import Campaign, LoraSpec, TrainSpec, dump
from modeling.load import TINY_ID, local_path
from protocol.signing.keys import Identity

pytestmark = pytest.mark.netns
COMMONS = str(Path(sys.executable).parent / "commons")
HOSTS = ["coordinator", "volunteer-a", "volunteer-b", "index", "developer"]
FLOWER_PORT, P2P_PORT, INDEX_PORT = 9092, 4051, 8765
NAME = "netns-dates-tiny"
ROUND_TIMEOUT = 40.0  # how long a round waits for the cut volunteer before closing with the survivor


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "COMMONS_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def wait_until(check, timeout: float, what: str, alive: subprocess.Popen | None = None,
               log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: the process exited with {alive.returncode} first\n{tail}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def events(home: Path) -> list[dict]:
    path = home / "campaigns" / NAME / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def net():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with lan(HOSTS) as network:
        yield network


def write_campaign(folder: Path) -> tuple[Path, list[Path]]:
    data = write_demo_data(folder / "data", nodes=2, per_node=48, test_size=16)
    campaign = Campaign(
        name=NAME, base_model=TINY_ID, eval_file=data["test"], rounds=2, min_nodes=1,
        round_timeout=ROUND_TIMEOUT, node_wait=90.0, eval_size=8, task="date normalization", datasets=[],
        lora=LoraSpec(r=4, alpha=8), train=TrainSpec(steps=4, batch_size=4, lr=2e-3, max_length=64),
    )
    path = folder / "campaign.toml"
    path.write_text(dump(campaign))
    return path, data["train"]


def start_logged(net: Lan, host: str, args: list[str], home: Path, **kwargs) -> tuple[subprocess.Popen, Path]:
    log = home.parent / f"{host}-{args[0]}.log"
    proc = net.popen(host, [COMMONS, *args], env=env_for(home), stderr=log.open("ab"), **kwargs)
    return proc, log


def test_campaign_survives_a_cut_volunteer_and_the_adapter_travels_to_a_developer(net: Lan,
                                                                                  tmp_path: Path) -> None:
    started = time.monotonic()
    local_path(TINY_ID)  # build the tiny model once in the shared cache, not in three racing processes
    homes = {host: tmp_path / host for host in HOSTS}
    for home in homes.values():
        home.mkdir()
    campaign_file, train_files = write_campaign(tmp_path)
    coordinator_addr = f"{net.ip('coordinator')}:{FLOWER_PORT}"

    coordinator, coordinator_log = start_logged(
        net, "coordinator", ["coordinator", "start", "--campaign", str(campaign_file), "--host", "0.0.0.0",
                             "--port", str(FLOWER_PORT), "--wait-nodes", "2", "--json"],
        homes["coordinator"], stdout=subprocess.PIPE, text=True)
    for host, data in zip(("volunteer-a", "volunteer-b"), train_files, strict=True):
        start_logged(net, host, ["node", "start", "--coordinator", coordinator_addr, "--data", str(data),
                                 "--max-cpu-threads", "1"], homes[host], stdout=subprocess.DEVNULL)

    # unplug volunteer-b while it trains round 1: its update cannot have been sent yet
    status_b = homes["volunteer-b"] / "status.json"
    wait_until(lambda: (read_json(status_b) or {}).get("state") == "training"
               and read_json(status_b)["round"] == 1, 150, "volunteer-b to start training round 1",
               coordinator, coordinator_log)
    net.cut("volunteer-b")
    assert not net.reachable("volunteer-b", "coordinator", FLOWER_PORT)
    assert net.reachable("volunteer-a", "coordinator", FLOWER_PORT)

    out, _ = coordinator.communicate(timeout=4 * ROUND_TIMEOUT + 120)
    assert coordinator.returncode == 0, coordinator_log.read_text(errors="replace")[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    cid = summary["adapter_cid"]
    assert summary["published"] and summary["signature_valid"] and cid.startswith("Qm")

    # both volunteers were sent round 1; only volunteer-a answered, and round 2 went to it alone
    key_a = Identity.load_or_create(homes["volunteer-a"] / "identity" / "ed25519.key").public_hex
    key_b = Identity.load_or_create(homes["volunteer-b"] / "identity" / "ed25519.key").public_hex
    log = events(homes["coordinator"])
    assert [e["nodes"] for e in log if e["event"] == "round_start"] == [2, 1]  # round 2 goes to who answers
    assert ([(e["round"], e["node"]) for e in log if e["event"] == "update"]
            == [(1, key_a[:16]), (2, key_a[:16])])
    assert [(e["round"], e["accepted"]) for e in log if e["event"] == "round_end"] == [(1, 1), (2, 1)]
    # join time: from `commons node start` on a fresh home, across the LAN, to the first accepted update
    joins = [e for e in log if e["event"] == "joined"]
    assert [(e["round"], e["node"]) for e in joins] == [(1, key_a[:16])]
    assert 0 < joins[0]["seconds"] < ROUND_TIMEOUT + 120, joins
    print(f"\njoin time (node start on a fresh home → first accepted update): {joins[0]['seconds']} s")
    result = read_json(homes["coordinator"] / "campaigns" / NAME / "result.json")
    assert result["contributors"] == [key_a] and key_b not in json.dumps(result)

    # the index host fetches the blocks from the coordinator over libp2p into its own store
    seeder = net.popen("coordinator",
                       [COMMONS, "p2p", "serve", "--listen", f"/ip4/{net.ip('coordinator')}/tcp/{P2P_PORT}",
                        "--json"], env=env_for(homes["coordinator"]), stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True)
    info = json.loads(seeder.stdout.readline())
    peer = next(a for a in info["addrs"] if a.startswith(f"/ip4/{net.ip('coordinator')}/"))
    fetched = net.run("index", [COMMONS, "p2p", "pull", cid, "--peer", peer, "--json"],
                      env=env_for(homes["index"]), capture_output=True, text=True, timeout=120, check=False)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert json.loads(fetched.stdout)["root"] == cid

    index, index_log = start_logged(net, "index",
                                    ["index", "serve", "--host", net.ip("index"), "--port", str(INDEX_PORT)],
                                    homes["index"], stdout=subprocess.DEVNULL)
    wait_until(lambda: net.reachable("developer", "index", INDEX_PORT), 60, "the index to listen", index,
               index_log)
    index_url = f"http://{net.ip('index')}:{INDEX_PORT}"

    # the coordinator announces the signed adapter to the index across the LAN
    envelope = (Path(result["adapter_dir"]) / "model.sig").read_text()
    body = tmp_path / "announce.json"
    body.write_text(json.dumps({"envelope": envelope, "cid": cid}))
    announced = net.run("coordinator",
                        ["curl", "-sS", "--fail-with-body", "-H", "content-type: application/json",
                                        "--data-binary", f"@{body}", f"{index_url}/api/announce"],
                        capture_output=True, text=True, timeout=60)
    assert announced.returncode == 0, announced.stdout + announced.stderr
    assert json.loads(announced.stdout)["cid"] == cid

    # a developer machine that knows only the index pulls it by name, verified block by block and signature
    pulled = net.run("developer", [COMMONS, "pull", NAME, "--index", index_url, "--json"],
                     env=env_for(homes["developer"]), capture_output=True, text=True, timeout=120,
                     check=False)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    report = json.loads(pulled.stdout)
    assert report["cid"] == cid
    published = Path(result["adapter_dir"])
    got = Path(report["path"])
    assert {p.name: p.read_bytes() for p in got.iterdir()} == {p.name: p.read_bytes()
                                                               for p in published.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors",
            "model.sig"} <= {p.name for p in got.iterdir()}
    # shown with -s; the runtime the docs quote
    print(f"multi-host netns test: {time.monotonic() - started:.0f}s")


@pytest.fixture
def nat_net():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with lan(["relay", "router", "puller"], nat={"home": "router"}) as network:
        yield network


def serve_p2p(net: Lan, host: str, home: Path, args: list[str]) -> dict:
    """`python -m protocol.p2p serve ARGS` on `host`; its first line (peer id, addresses, circuits)."""
    proc = net.popen(host, [sys.executable, "-m", "protocol.p2p", "serve", "--store", str(home / "blocks"),
                            "--listen", f"/ip4/{net.ip(host)}/tcp/{P2P_PORT}", *args],
                     env=env_for(home), stdout=subprocess.PIPE, stderr=(home / "serve.log").open("ab"),
                     text=True)
    line = proc.stdout.readline()
    assert line, (home / "serve.log").read_text(errors="replace")[-3000:]
    return json.loads(line)


# python -c: the providers of CID on the DHT, asked of the relay at ADDR (argv: ADDR CID), as JSON
FIND_PROVIDERS = """
import json, sys, trio
from protocol.content.blockstore import BlockStore
from protocol.p2p import dht
from protocol.p2p.node import open_node

async def main():
    async with open_node(BlockStore(), dht=True, bootstrap=[sys.argv[1]]) as node:
        with trio.fail_after(30):
            while not (found := await dht.find_providers(node.dht, sys.argv[2])):
                await trio.sleep(0.2)
        print(json.dumps(found))

trio.run(main)
"""


@pytest.mark.parametrize("punch", [[], ["--hole-punch"]], ids=["relayed", "hole-punch"])
def test_a_seeder_behind_nat_serves_its_blocks_through_a_relay(nat_net: Lan, tmp_path: Path,
                                                               punch: list[str]) -> None:
    # with --hole-punch the seeder also runs DCUtR; this puller listens on loopback, so it stays relayed
    net = nat_net
    homes = {host: tmp_path / host for host in ("relay", "home", "puller")}
    for home in homes.values():
        home.mkdir()
    payload = tmp_path / "adapter.bin"
    payload.write_bytes(os.urandom(4 * 1024 * 1024 + 3))

    relay = serve_p2p(net, "relay", homes["relay"], ["--relay"])
    relay_addr = relay["addrs"][0]
    seeder = serve_p2p(net, "home", homes["home"], ["--add", str(payload), "--reserve", relay_addr, *punch])
    circuit = f"{relay_addr}/p2p-circuit/p2p/{seeder['peer_id']}"
    assert seeder["circuit_addrs"] == [circuit] and seeder["relay_errors"] == {}

    # the NAT is real: home reaches out, but even with a route to its subnet nobody reaches in
    net.route_via("puller", "home")
    assert net.reachable("home", "relay", P2P_PORT)
    assert not net.reachable("puller", "home", P2P_PORT)

    # the puller knows only the relay and the CID: the DHT names the seeder, with its circuit
    find = [sys.executable, "-c", FIND_PROVIDERS, relay_addr, seeder["roots"][0]]
    found = json.loads(net.run("puller", find, env=env_for(homes["puller"]), capture_output=True, text=True,
                               timeout=60, check=True).stdout)
    assert [peer for peer, _ in found] == [seeder["peer_id"]] and circuit in found[0][1], found
    pulled = net.run("puller", [sys.executable, "-m", "protocol.p2p", "pull", seeder["roots"][0], "--store",
                                str(homes["puller"] / "blocks"), "--peer", circuit, "--out",
                                str(tmp_path / "out.bin"), "--no-progress"],
                     env=env_for(homes["puller"]), capture_output=True, text=True, timeout=120, check=False)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    report = json.loads(pulled.stdout)
    assert report["root"] == seeder["roots"][0] and report["peers_failed"] == {}
    assert (tmp_path / "out.bin").read_bytes() == payload.read_bytes()
    print(f"4 MiB through the relay: {report['seconds']:.2f}s ({report['mb_per_s']} MB/s)")
