"""A volunteer restarted mid-round resumes from its own checkpoint and ends where the uninterrupted run
would have; the coordinator re-sends a rejoined node its own shard instead of reassigning it.

Fast tests use the tiny model in this process (the crash is an exception raised after the checkpoint was
written); the slow one kills a real SuperNode with SIGKILL mid-round and starts it again on the same home."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from commons.demo_task import write_demo_data
from coordinator import rounds
from coordinator.campaign import parse
from modeling.load import load_base
from modeling.lora import get_state, wrap
from node import resume, worker
from node.settings import NodeSettings
from protocol.data.records import read_records
from protocol.signing.keys import Identity

STEPS, CRASH_AT = 8, 3  # 12 records, 2 a batch: the data is reshuffled after the restart


class Crash(Exception):
    """The node's process dying (SIGKILL) right after a step."""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One round's instruction as the coordinator sends it: config, global tensors, a shard's keys."""
    root = tmp_path_factory.mktemp("work")
    data = write_demo_data(root / "data", 1, 12, 4)
    campaign = parse({"name": "resume", "base_model": "tiny", "eval_file": str(data["test"]), "min_nodes": 1,
                      "train": {"steps": STEPS, "batch_size": 2, "max_length": 48, "lr": 0.02}}, root)
    base, _ = load_base("tiny")
    tensors = get_state(wrap(base, {**campaign.lora.__dict__}))
    rng = np.random.default_rng(0)  # a global adapter that is not the init: B != 0, so every layer matters
    tensors = {k: (v + rng.normal(0, 0.02, v.shape)).astype(np.float32) for k, v in tensors.items()}
    keys = sorted(k for k in tensors if ".layers.0." in k)
    return {"campaign": campaign, "tensors": tensors, "keys": keys, "data": data["train"][0],
            "config": rounds.train_instruction(campaign, 1, keys)}


def settings(tmp_path: Path, name: str, data: Path) -> NodeSettings:
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return NodeSettings(home=tmp_path / name, data=data, threads=1)


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> list[dict]:
    """Make the node die right after `step` (its status line is written once per step); returns every
    status line written, the crashed run's and the next one's."""
    seen: list[dict] = []
    real = worker.status

    def status(s: NodeSettings, **fields: Any) -> None:
        seen.append(fields)
        real(s, **fields)
        if fields.get("state") == "training" and fields.get("step") == step and not any(
                f.get("crashed") for f in seen):
            seen.append({"crashed": True})
            raise Crash(f"killed after step {step}")

    monkeypatch.setattr(worker, "status", status)
    return seen


def resume_files(home: Path) -> list[Path]:
    folder = home / "node" / "resume"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_a_round_resumed_after_a_crash_ends_exactly_where_the_straight_run_does(
    work: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("COMMONS_RESUME_SECONDS", "0")  # a checkpoint after every step
    straight = settings(tmp_path, "straight", work["data"])
    wire, metrics, _ = worker.train_round(straight, work["config"], work["tensors"])
    assert resume_files(straight.home) == []  # removed once the update is made
    assert metrics["resumed_from"] == 0

    node = settings(tmp_path, "crashy", work["data"])
    statuses = crash_at(monkeypatch, CRASH_AT)
    with pytest.raises(Crash):
        worker.train_round(node, work["config"], work["tensors"])
    [saved] = resume_files(node.home)
    assert saved.suffix == ".pt"

    with caplog.at_level(logging.INFO, logger="commons.node"):
        wire2, metrics2, proof2 = worker.train_round(node, work["config"], work["tensors"])
    assert f"round 1: resuming at step {CRASH_AT} of {STEPS} from checkpoint" in caplog.text
    assert set(wire2) == set(work["keys"])
    for key in wire:
        np.testing.assert_allclose(wire2[key], wire[key], rtol=0, atol=1e-6)
    # the whole round is reported, not the part after the restart
    for field in ("num_examples", "tokens", "loss", "upload_bytes"):
        assert metrics2[field] == pytest.approx(metrics[field], rel=1e-6), field
    assert metrics2["num_examples"] == STEPS * 2 and metrics2["resumed_from"] == CRASH_AT
    assert proof2["public_key"] == Identity.load_or_create(node.home / "identity" / "ed25519.key").public_hex
    after = [s for s in statuses[statuses.index({"crashed": True}) + 1:]]
    assert after[0] == {"state": "resuming", "round": 1, "step": CRASH_AT, "steps": STEPS,
                        "resumed_from": CRASH_AT}
    assert [s["step"] for s in after if s.get("state") == "training"] == list(range(CRASH_AT + 1, STEPS + 1))
    assert resume_files(node.home) == []


def test_a_checkpoint_is_only_reused_for_exactly_the_same_work(work: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMONS_RESUME_SECONDS", "0")
    node = settings(tmp_path, "node", work["data"])
    crash_at(monkeypatch, 2)
    with pytest.raises(Crash):
        worker.train_round(node, work["config"], work["tensors"])
    records = read_records(work["data"])
    same = resume.open_checkpoint(node.home, work["config"], work["tensors"], records)
    assert same.step == 2

    other_keys = sorted(k for k in work["tensors"] if ".layers.1." in k)
    other_tensors = {**work["tensors"], work["keys"][0]: work["tensors"][work["keys"][0]] + 1e-3}
    config = work["config"]
    different = {
        "other keys": (replace(config, keys=tuple(other_keys)), work["tensors"], records),
        "other global tensors": (config, other_tensors, records),
        "other local data": (config, work["tensors"], records[1:]),
        "other training config": (replace(config, lr=0.5), work["tensors"], records),
    }
    for why, (cfg, tensors, recs) in different.items():
        assert resume.open_checkpoint(node.home, cfg, tensors, recs).state is None, why
    assert resume_files(node.home) == [same.path]  # the same round's work is never pruned

    later = resume.open_checkpoint(node.home, replace(config, round=2), work["tensors"], records)
    assert later.state is None and resume_files(node.home) == []  # an earlier round's file is stale


def test_a_torn_checkpoint_starts_the_round_over(work: dict, tmp_path: Path) -> None:
    node = settings(tmp_path, "node", work["data"])
    records = read_records(work["data"])
    ckpt = resume.open_checkpoint(node.home, work["config"], work["tensors"], records)
    ckpt.path.parent.mkdir(parents=True)
    ckpt.path.write_bytes(b"PK\x03\x04 not a whole file")
    assert resume.open_checkpoint(node.home, work["config"], work["tensors"], records).state is None
    _, metrics, _ = worker.train_round(node, work["config"], work["tensors"])
    assert metrics["resumed_from"] == 0 and metrics["num_examples"] == STEPS * 2


def test_checkpoints_are_due_by_time_or_by_steps_and_never_after_the_last_step(tmp_path: Path) -> None:
    by_steps = resume.Checkpoint(tmp_path / "a.pt", every=3, every_seconds=1e9)
    assert [s for s in range(1, 10) if by_steps.due(s, 9)] == [3, 4, 5, 6, 7, 8]  # due until a save happens
    by_time = resume.Checkpoint(tmp_path / "b.pt", every_seconds=0.0)
    assert by_time.due(1, 9) and not by_time.due(9, 9)
    assert not resume.Checkpoint(tmp_path / "c.pt").due(1, 9)  # the default waits 30 s of training


def test_a_node_that_reconnects_mid_round_is_sent_its_own_shard_again(tmp_path: Path) -> None:
    from test_runner import LocalGrid, events, setup

    from coordinator import runner

    class Rejoining(LocalGrid):
        """Node 1 dies on its first train message and comes back at once as Flower node 200 (same home);
        its old id 101 stays listed until the new one has answered its query."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.queries: list[int] = []
            self.gone: set[int] = set()

        def get_node_ids(self) -> list[int]:
            return [i for i in self.ids if i not in self.gone]

        def deliver(self, msg: Any) -> Any:
            dst = msg.metadata.dst_node_id
            if msg.metadata.message_type == "query":
                self.queries.append(dst)
                self.gone |= {101} if dst == 200 else set()
            elif dst == 101 and 200 not in self.ids:
                self.died_with = json.loads(str(msg.content["config"]["keys"]))
                self.ids.append(200)
                self.homes.append(self.homes[1])
                self.data.append(self.data[1])
                self.behave.append("honest")
                return None
            return super().deliver(msg)

    campaign, data, home = setup(tmp_path, 2, rounds=2, round_timeout=1.0)
    grid = Rejoining(tmp_path, data, ["honest"] * 2)
    result = runner.run(grid, campaign, home)
    log = events(home)
    key = Identity.load_or_create(tmp_path / "node1" / "identity" / "ed25519.key").public_hex
    assert [(e["round"], e["node"], e["node_id"]) for e in log
            if e["event"] == "rejoined"] == [(1, key[:16], 200)]
    assert not any(e["event"] == "reassigned" for e in log)  # its span was not handed to anyone else
    assert [(i, keys) for i, group, keys in grid.sent if group == "1.rejoin1"] == [(2, grid.died_with)]
    assert [(e["round"], e["accepted"]) for e in log if e["event"] == "round_end"] == [(1, 2), (2, 2)]
    assert {e["node"]: e["rounds"] for e in result["ledger"]}[key] == 2
    assert sorted(grid.queries) == [100, 101, 200]  # each id asked once; round 2 asked no one


@pytest.mark.slow  # ~60 s: real SuperLink and SuperNodes; one is killed with -9 mid-round and restarted
def test_a_volunteer_killed_mid_round_rejoins_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    from test_federation_e2e import ended, read_events, wait_for, write_campaign

    from commons.flower import Network

    steps = 60
    campaign, data = write_campaign(tmp_path, 2, rounds=1, round_timeout=150)
    campaign.write_text(campaign.read_text().replace("steps = 1\n", f"steps = {steps}\n"))
    env = {"COMMONS_CACHE": os.environ["COMMONS_CACHE"], "COMMONS_RESUME_SECONDS": "0"}  # save every step
    homes = [tmp_path / f"node{i}" for i in range(2)]
    key = Identity.load_or_create(homes[1] / "identity" / "ed25519.key").public_hex

    def node(i: int, name: str) -> Any:
        (homes[i] / "logs").mkdir(parents=True, exist_ok=True)
        cfg = {"home": str(homes[i]), "data": str(data[i]), "threads": 1}
        return net.start_supernode(name, net.address, cfg, env={**env, "COMMONS_HOME": str(homes[i])})

    def mid_round() -> bool:
        try:
            state = json.loads((homes[1] / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return state.get("state") == "training" and state["step"] >= 5 and bool(resume_files(homes[1]))

    started = time.monotonic()
    net = Network(tmp_path / "net")
    try:
        net.start_superlink(env={**env, "COMMONS_HOME": str(tmp_path / "coord")})
        victim = [node(0, "node0"), node(1, "node1")][1]
        net.submit({"campaign": str(campaign), "home": str(tmp_path / "coord")})
        deadline = time.monotonic() + 120
        while not mid_round():
            assert time.monotonic() < deadline, (
                f"node1 never checkpointed; events: {read_events(tmp_path)[-3:]}")
            time.sleep(0.1)
        os.killpg(victim.pid, signal.SIGKILL)  # the SuperNode and the ClientApp training under it
        node(1, "node1-again")  # the volunteer restarts it: same home, same key, a new Flower node id
        log = wait_for(tmp_path, ended, 150)
    finally:
        net.close()
    rejoined = [e for e in log if e["event"] == "rejoined"]
    assert [(e["round"], e["node"]) for e in rejoined] == [(1, key[:16])]
    resumed = [line for line in (homes[1] / "logs" / "node.log").read_text().splitlines()
               if "resuming" in line]
    assert len(resumed) == 1, resumed
    step = int(resumed[0].split("resuming at step ")[1].split(" ")[0])
    assert 5 <= step < steps and f"of {steps} from checkpoint" in resumed[0]
    updates = [e for e in log if e["event"] == "update" and e["node"] == key[:16]]
    assert [(e["group"], e["resumed_from"]) for e in updates] == [("1.rejoin1", step)]
    end = next(e for e in log if e["event"] == "round_end")
    assert (end["accepted"] == 2 and not end["rejected_nodes"]
            and not any(e["event"] == "reassigned" for e in log))
    assert resume_files(homes[1]) == []  # removed once the update was made
    print(f"rejoin test: {time.monotonic() - started:.0f}s")
