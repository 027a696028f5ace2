"""Campaign lifecycle with real processes (Flower SuperLink + SuperNodes, tiny model): the coordinator
killed with -9 resumes from its last completed round; a volunteer killed mid-round has its span
reassigned and the round completes; a forged update is refused with a reason in the events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from commons.demo_task import write_demo_data
from commons.flower import Network
from protocol.signing.keys import Identity

TESTS = Path(__file__).resolve().parent


class TestNetwork(Network):
    """Our network, whose volunteers run the test-only ClientApp that can forge signatures
    (tests/attack_client_app.py): their own local choice (COMMONS_NODE_APP), not something the
    coordinator can send."""

    __test__ = False

    def _spawn(self, name: str, args: list[str], env: dict[str, str], group: int | None = None):
        local = {"PYTHONPATH": str(TESTS), "COMMONS_NODE_APP": "attack_client_app:app"}
        return super()._spawn(name, args, {**local, **env}, group=group)


def write_campaign(root: Path, nodes: int, rounds: int, round_timeout: float) -> tuple[Path, list[Path]]:
    data = write_demo_data(root / "data", nodes, 12, 4)
    path = root / "campaign.toml"
    path.write_text(
        f'name = "life"\nbase_model = "tiny"\neval_file = "{data["test"]}"\nrounds = {rounds}\n'
        'min_nodes = 2\n'
        f"eval_size = 4\nround_timeout = {round_timeout}\nnode_wait = 120\n"
        "[train]\nsteps = 1\nbatch_size = 2\nmax_length = 48\n"
    )
    return path, data["train"]


def start(net: Network, root: Path, data: list[Path], attack: dict[int, str] | None = None) -> list:
    env = {"COMMONS_CACHE": os.environ["COMMONS_CACHE"], "PYTHONPATH": str(TESTS)}
    net.start_superlink(env={**env, "COMMONS_HOME": str(root / "coord")})
    procs = []
    for i, file in enumerate(data):
        home = root / f"node{i}"
        (home / "logs").mkdir(parents=True, exist_ok=True)
        cfg = {"home": str(home), "data": str(file), "threads": 1, "attack": (attack or {}).get(i, "")}
        procs.append(net.start_supernode(f"node{i}", net.address, cfg,
                                         env={**env, "COMMONS_HOME": str(home)}))
    return procs


def read_events(root: Path) -> list[dict]:
    path = root / "coord" / "campaigns" / "life" / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for(root: Path, test, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = read_events(root)
        if any(e["event"] == "error" for e in log):
            raise AssertionError(f"campaign failed: {[e for e in log if e['event'] == 'error']}")
        if test(log):
            return log
        time.sleep(0.5)
    raise AssertionError(f"timed out; last events: {[e['event'] for e in read_events(root)][-8:]}")


def ended(log: list[dict]) -> bool:
    return any(e["event"] == "campaign_end" for e in log)


def volunteer(root: Path, i: int, data: Path, address: str) -> subprocess.Popen:
    """`commons node start`: the volunteer daemon itself, which must outlive coordinator restarts."""
    home = root / f"node{i}"
    env = {**os.environ, "COMMONS_HOME": str(home), "PYTHONPATH": str(TESTS)}
    out = (root / f"node{i}.out").open("ab")
    return subprocess.Popen([str(Path(sys.executable).parent / "commons"), "node", "start", "--coordinator",
                             address, "--data", str(data), "--max-cpu-threads", "1"], env=env, stdout=out,
                            stderr=out)


@pytest.mark.slow  # about 2 minutes on a loaded 2-core machine
def test_coordinator_killed_with_9_resumes_and_the_volunteers_reconnect(tmp_path: Path) -> None:
    from commons.flower import free_port

    campaign, data = write_campaign(tmp_path, 2, rounds=2, round_timeout=300)
    port = free_port()
    env = {"COMMONS_CACHE": os.environ["COMMONS_CACHE"], "PYTHONPATH": str(TESTS),
           "COMMONS_HOME": str(tmp_path / "coord")}
    net = TestNetwork(tmp_path / "first")
    daemons = []
    try:
        net.start_superlink(port=port, env=env)
        daemons = [volunteer(tmp_path, i, file, net.address) for i, file in enumerate(data)]
        net.submit({"campaign": str(campaign), "home": str(tmp_path / "coord")})
        wait_for(tmp_path, lambda log: any(e["event"] == "round_start" and e["round"] == 2 for e in log), 240)
        os.killpg(net.procs[0].pid, signal.SIGKILL)  # the SuperLink and the ServerApp it started
        net.close()
        assert not ended(read_events(tmp_path))
        # a new SuperLink on the same address with the same campaign file and coordinator home; the
        # volunteers' daemons are left alone: they must find it by themselves
        net = TestNetwork(tmp_path / "second")
        net.start_superlink(port=port, env=env)
        net.submit({"campaign": str(campaign), "home": str(tmp_path / "coord")})
        log = wait_for(tmp_path, ended, 300)
        assert all(d.poll() is None for d in daemons)  # never restarted by hand
    finally:
        net.close()
        for d in daemons:
            d.send_signal(signal.SIGTERM)
        for d in daemons:
            d.wait(30)
    assert [e["round"] for e in log if e["event"] == "resumed"] == [1]
    assert [e["round"] for e in log if e["event"] == "round_end"] == [1, 2]  # round 1 was not trained again
    assert sum(e["event"] == "update" and e["round"] == 1 for e in log) == 2
    result = json.loads((tmp_path / "coord" / "campaigns" / "life" / "result.json").read_text())
    assert result["rounds"] == 2 and all(e["rounds"] == 2 for e in result["ledger"])
    said = (tmp_path / "node0.out").read_text()
    assert "lost the coordinator" in said and "reconnecting" in said
    assert [d.returncode for d in daemons] == [0, 0]  # SIGTERM is a clean stop


@pytest.mark.slow  # about 90 s: the dead node costs one round_timeout
def test_a_node_killed_mid_round_is_covered_and_a_forger_is_refused(tmp_path: Path) -> None:
    # > the ~25 s an honest node needs
    campaign, data = write_campaign(tmp_path, 4, rounds=1, round_timeout=40)
    keys = [Identity.load_or_create(tmp_path / f"node{i}" / "identity" / "ed25519.key").public_hex[:16]
            for i in range(4)]
    net = TestNetwork(tmp_path / "net")
    try:
        procs = start(net, tmp_path, data, attack={3: "wrongkey"})
        net.submit({"campaign": str(campaign), "home": str(tmp_path / "coord")})
        log = wait_for(tmp_path, lambda log: any(e["event"] == "plan" for e in log), 240)
        plan = next(e for e in log if e["event"] == "plan")
        lane_of = {s["node"]: s["lane"] for s in plan["shards"]}
        victim = next(i for i in range(3) if sum(lane == lane_of[keys[i]] for lane in lane_of.values()) > 1)
        os.killpg(procs[victim].pid, signal.SIGKILL)  # the node got its shard and dies before replying
        log = wait_for(tmp_path, ended, 300)
    finally:
        net.close()
    dropped = [e for e in log if e["event"] == "update_dropped"]
    assert [e["node"] for e in dropped] == [keys[3]]
    assert "signed with a key other than the one it registered" in dropped[0]["reason"]
    moved = next(e for e in log if e["event"] == "reassigned")
    assert set(moved["dropped"]) == {keys[victim], keys[3]} and min(moved["coverage"]) >= 1
    assert all(e["event"] != "reassigned" or min(e["coverage"]) >= 1 for e in log)
    end = next(e for e in log if e["event"] == "round_end")
    assert end["accepted"] >= 2 and min(end["coverage"]) >= 1
    assert keys[victim] not in {e["node"] for e in log if e["event"] == "update"}
