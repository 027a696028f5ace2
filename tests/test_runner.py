"""The campaign runner with volunteers in this process: the real ClientApp functions behind a Grid that
delivers messages directly (Flower's transport is the only thing replaced; tests/test_federation_e2e.py
runs the same scenarios with real processes). Tiny model, a few seconds per campaign."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from commons.demo_task import write_demo_data
from coordinator import rounds, runner
from coordinator.campaign import parse
from coordinator.rules.exact import PREFIX
from node import client_app
from protocol.errors import CommonsError
from protocol.instruction import TrainInstruction
from protocol.signing.keys import Identity

GPU = {"device": "cuda", "gpu": "test", "vram_gb": 24.0, "cpu_cores": 8, "ram_gb": 64.0, "bf16": True}
CPU = {"device": "cpu", "vram_gb": None, "cpu_cores": 2, "ram_gb": 4.0, "bf16": False}


class Crash(Exception):
    """The coordinator process dying (kill -9) at a chosen point."""


class LocalGrid:
    """Delivers each message to a volunteer's ClientApp function. `behave[i]` per node: "honest",
    "dead@R" (never answers train messages from round R on), "wrongkey" (signs with another key),
    "nan" (sends NaN), "ctrlc@R" (stopped when round R's work arrives, back under a new Flower id a few
    looks later), "late" (connects a few looks after the start); `caps[i]` replaces the hardware report;
    `crash_at` raises at that round. A ClientApp that raises is answered for as Flower does:
    an error reply."""

    def __init__(self, root: Path, data: list[Path], behave: list[str], caps: list[dict] | None = None,
                 crash_at: int | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.ids: list[int | None] = [None if b == "late" else 100 + i for i, b in enumerate(behave)]
        self.away = {i: 3 for i, b in enumerate(behave) if b == "late"}  # node -> looks until it (re)connects
        self.homes = [root / f"node{i}" for i in range(len(data))]
        self.data, self.behave, self.caps, self.crash_at = data, list(behave), caps, crash_at
        self.sent: list[tuple[int, str, list[str]]] = []  # (node, group, keys asked)

    def get_node_ids(self) -> list[int]:
        for i in list(self.away):
            self.away[i] -= 1
            if self.away[i] <= 0:
                del self.away[i]
                self.ids[i] = 100 + i if self.behave[i] == "late" else 200 + i
                self.behave[i] = "honest"
        return [n for n in self.ids if n is not None]

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        return [r for r in (self.deliver(m) for m in messages) if r is not None]

    def deliver(self, msg: Message) -> Message | None:
        try:
            return self._deliver(msg)
        except Crash:
            raise
        except Exception as ex:  # noqa: BLE001 - what Flower's ClientApp runner does with any exception
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    def _deliver(self, msg: Message) -> Message | None:
        if msg.metadata.dst_node_id not in self.ids:  # stopped: the SuperLink answers for it
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=msg)
        i = self.ids.index(msg.metadata.dst_node_id)
        ctx = Context(1, msg.metadata.dst_node_id, {"home": str(self.homes[i]), "data": str(self.data[i])},
                      RecordDict(), {})
        if msg.metadata.message_type == "query.ended":
            return client_app.ended(msg, ctx)
        if msg.metadata.message_type == "query":
            reply = client_app.query(msg, ctx)
            if self.caps:
                reply.content["info"]["capability"] = json.dumps(self.caps[i])
            return reply
        instruction = TrainInstruction.from_config(dict(msg.content["config"]))
        round_, behave = instruction.round, self.behave[i]
        if self.crash_at == round_:
            raise Crash(f"coordinator killed in round {round_}")
        self.sent.append((i, msg.metadata.group_id, list(instruction.keys or ())))
        if behave.startswith("dead@") and round_ >= int(behave[5:]):
            return None
        if behave.startswith("ctrlc@") and round_ >= int(behave[6:]):
            self.ids[i], self.away[i] = None, 2
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=msg)
        reply = client_app.train(msg, ctx)
        if behave == "nan":
            from flwr.app import Array, ArrayRecord

            from protocol.packed import pack, unpack

            wire = unpack({k: v.numpy() for k, v in reply.content["adapter"].items()})
            wire[min(wire)][...] = np.nan
            reply.content["adapter"] = ArrayRecord({k: Array(v) for k, v in pack(wire).items()})
            self._resign(reply, self.homes[i] / "identity" / "ed25519.key", round_, instruction.campaign)
        if behave == "wrongkey":
            self._resign(reply, None, round_, instruction.campaign)
        return reply

    @staticmethod
    def _resign(reply: Message, key: Path | None, round_: int, campaign: str) -> None:
        from protocol.update import update_digest

        identity = Identity.load_or_create(key) if key else Identity.generate()
        from protocol.packed import unpack

        wire = unpack({k: v.numpy() for k, v in reply.content["adapter"].items()})
        proof = reply.content["proof"]
        proof["public_key"] = identity.public_hex
        proof["signature"] = identity.sign(update_digest(campaign, round_, wire)).hex()


def setup(tmp_path: Path, nodes: int, **fields: Any):
    data = write_demo_data(tmp_path / "data", nodes, 8, 4)
    raw = {"name": "t", "base_model": "tiny", "eval_file": str(data["test"]), "rounds": 2, "min_nodes": 2,
           "eval_size": 4, "train": {"steps": 1, "batch_size": 2, "max_length": 48}, **fields}
    return parse(raw, tmp_path), data["train"], tmp_path / "coord"


def events(home: Path, name: str = "t") -> list[dict]:
    return [json.loads(x) for x in (home / "campaigns" / name / "events.jsonl").read_text().splitlines()]


def final_tensors(home: Path) -> dict[str, np.ndarray]:
    state = json.loads((home / "campaigns" / "t" / "checkpoint" / "state.json").read_text())
    return load_file(str(home / "campaigns" / "t" / "checkpoint" / state["weights"]))


def test_shards_are_sized_to_hardware_and_cover_every_layer(tmp_path: Path) -> None:
    campaign, data, home = setup(tmp_path, 3, upload_dtype="bf16", min_coverage=2)
    grid = LocalGrid(tmp_path, data, ["honest"] * 3, caps=[CPU, GPU, CPU])
    result = runner.run(grid, campaign, home)
    plans = [e for e in events(home) if e["event"] == "plan"]
    assert len(plans) == 2 and all(min(p["coverage"]) >= 2 for p in plans)
    shard_of = {s["node"]: s for s in plans[0]["shards"]}
    gpu = Identity.load_or_create(tmp_path / "node1" / "identity" / "ed25519.key").public_hex[:16]
    assert shard_of[gpu]["keys"] == max(s["keys"] for s in shard_of.values())  # the GPU trains the most
    # each CPU node was asked for (and sent back) only part of the adapter
    asked = {i: len(keys) for i, group, keys in grid.sent if group == "1"}
    total = len(final_tensors(home))
    assert asked[1] == total and asked[0] + asked[2] == total and 0 < asked[0] < total
    uploads = {e["node"]: e["upload_bytes"]
               for e in events(home) if e["event"] == "update" and e["round"] == 1}
    assert uploads[gpu] == max(uploads.values()) and min(uploads.values()) <= uploads[gpu] / 2 + 64
    b = [v for k, v in final_tensors(home).items() if "lora_B" in k]
    assert all(np.abs(x).sum() > 0 for x in b)  # every layer trained
    assert result["published"] is True or "not above base" in result["reason"]
    assert len(result["ledger"]) == 3 and all(e["rounds"] == 2 for e in result["ledger"])


def test_a_node_that_drops_mid_round_has_its_span_retrained_by_its_lane_neighbour(tmp_path: Path) -> None:
    # the dead node costs nothing here (this grid answers at once); the catch-up must fit in the deadline
    campaign, data, home = setup(tmp_path, 3, rounds=1, round_timeout=120, min_coverage=2)
    first = LocalGrid(tmp_path / "probe", data, ["honest"] * 3)
    plan = rounds.plan_round(campaign, sorted(final_keys(tmp_path, campaign)),
                             rounds.capabilities(rounds.query_nodes(first, first.ids, 1),
                                                 lambda *a, **k: None))
    lanes: dict[int, list[str]] = {}
    for s in plan.shards:
        lanes.setdefault(s.lane, []).append(s.node_id)
    victim = next(n for members in lanes.values() if len(members) > 1 for n in members)
    keys = [Identity.load_or_create(tmp_path / "probe" / f"node{i}" / "identity" / "ed25519.key").public_hex
            for i in range(3)]
    behave = ["dead@1" if k == victim else "honest" for k in keys]
    grid = LocalGrid(tmp_path / "probe", data, behave)
    runner.run(grid, campaign, home)
    log = events(home)
    moved = next(e for e in log if e["event"] == "reassigned")
    assert moved["dropped"] == [victim[:16]] and min(moved["coverage"]) >= 1 and sum(moved["to"].values()) > 0
    catch_up = [e for e in log if e["event"] == "update" and e["group"] == "1.1"]
    assert [e["node"] for e in catch_up] == list(moved["to"])
    end = next(e for e in log if e["event"] == "round_end")
    assert end["accepted"] == 2 and min(end["coverage"]) >= 1
    assert all(np.abs(v).sum() > 0 for k, v in final_tensors(home).items() if "lora_B" in k)


def final_keys(tmp_path: Path, campaign: Any) -> list[str]:
    from modeling.load import load_base
    from modeling.lora import get_state, wrap

    base, _ = load_base(campaign.base_model)
    return list(get_state(wrap(base, {**campaign.lora.__dict__})))


def test_forged_and_nan_updates_are_rejected_with_a_reason(tmp_path: Path) -> None:
    campaign, data, home = setup(tmp_path, 4, rounds=1)
    runner.run(LocalGrid(tmp_path, data, ["honest", "wrongkey", "honest", "nan"]), campaign, home)
    log = events(home)
    forged = [e["reason"] for e in log if e["event"] == "update_dropped"]
    assert len(forged) == 1 and "signed with a key other than the one it registered" in forged[0]
    end = next(e for e in log if e["event"] == "round_end")
    assert any("NaN" in why for why in end["rejected_nodes"].values()) and end["accepted"] == 2


def test_a_coordinator_killed_mid_campaign_resumes_after_the_last_completed_round(tmp_path: Path) -> None:
    campaign, data, home = setup(tmp_path, 2, rounds=2)
    with pytest.raises(Crash):
        runner.run(LocalGrid(tmp_path, data, ["honest"] * 2, crash_at=2), campaign, home)
    grid = LocalGrid(tmp_path, data, ["honest"] * 2)
    result = runner.run(grid, campaign, home)
    log = events(home)
    assert [e["round"] for e in log if e["event"] == "resumed"] == [1]
    assert [e["round"] for e in log if e["event"] == "round_end"] == [1, 2]
    assert {group for _, group, _ in grid.sent} == {"2"}  # round 1 was not trained again
    assert [e["event"] for e in log].count("base_eval") == 1
    assert all(e["rounds"] == 2 for e in result["ledger"])


def test_exact_rule_keeps_the_residual_and_publishes_a_peft_adapter(tmp_path: Path) -> None:
    campaign, data, home = setup(tmp_path, 2, rounds=1, aggregation="exact", shards="none",
                                 train={"steps": 2, "batch_size": 2, "max_length": 48, "lr": 0.05})
    result = runner.run(LocalGrid(tmp_path, data, ["honest"] * 2), campaign, home)
    saved = final_tensors(home)
    residual = {k: v for k, v in saved.items() if k.startswith(PREFIX)}
    assert residual and max(float(np.abs(v).max()) for v in residual.values()) > 0
    projected = next(e for e in events(home) if e["event"] == "projected")
    assert projected["accuracy_published"] == result["accuracy_adapter"]
    if result["published"]:
        from peft import PeftModel

        from modeling.load import load_base

        PeftModel.from_pretrained(load_base("tiny")[0], result["adapter_dir"])


def test_central_dp_is_accounted_in_the_manifest_eval(tmp_path: Path) -> None:
    campaign, data, home = setup(tmp_path, 2, rounds=1, shards="none", aggregation="fedavg",
                                 dp={"noise_multiplier": 1.0, "clip": 1.0})
    result = runner.run(LocalGrid(tmp_path, data, ["honest"] * 2), campaign, home)
    end = next(e for e in events(home) if e["event"] == "round_end")
    assert (end["dp"]["epsilon"] > 0 and end["dp"]["delta"] == 1e-5
            and result["dp"]["epsilon"] == end["dp"]["epsilon"])


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"shards": "some"}, "use one of auto, none"),
        ({"upload_dtype": "fp8"}, "use one of fp32, bf16, int8"),
        ({"dp": {"noise_multiplier": 1.0, "clip": 1.0}, "aggregation": "exact"}, "full-rank residual"),
        ({"dp": {"noise_multiplier": 1.0}}, "[dp]"),
    ],
)
def test_campaign_mistakes_are_one_line_errors(tmp_path: Path, fields: dict, fragment: str) -> None:
    with pytest.raises(CommonsError) as err:
        setup(tmp_path, 1, **fields)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_node_whose_key_changes_or_reply_fails_is_dropped_with_a_reason(tmp_path: Path) -> None:
    campaign, _, _ = setup(tmp_path, 1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(RecordDict(), dst_node_id=7, message_type="train")
    failed = Message(Error(code=0, reason="out of memory"), reply_to=msg)
    assert "failed: out of memory" in rounds.check_reply(failed, campaign, 1, "ab" * 32, {})


@pytest.fixture
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's looks at the grid, seconds apart for real volunteers, at test speed."""
    monkeypatch.setattr(runner, "WAIT_SECONDS", 0.01)
    monkeypatch.setattr(rounds, "POLL_SECONDS", 0.01)


def test_a_volunteer_with_a_malformed_data_line_is_left_out_with_its_reason(tmp_path: Path,
                                                                            quick_polls: None) -> None:
    campaign, data, home = setup(tmp_path, 3, rounds=1)
    lines = data[2].read_text().splitlines()
    data[2].write_text("\n".join([*lines[:2], "{not json", *lines[2:]]) + "\n")  # line 3 of its file
    result = runner.run(LocalGrid(tmp_path, data, ["honest"] * 3), campaign, home)
    log = events(home)
    ignored = [e for e in log if e["event"] == "node_ignored"]
    said = (f"{data[2]}:3: not JSON (Expecting property name enclosed in double quotes); "
            "fix or remove the line")
    assert [e["reason"] for e in ignored] == [said]
    assert next(e for e in log if e["event"] == "round_start")["nodes"] == 2
    assert result["rounds"] == 1 and len(result["ledger"]) == 2


def test_a_campaign_waits_for_volunteers_within_its_patience(tmp_path: Path, quick_polls: None) -> None:
    campaign, data, home = setup(tmp_path, 2, rounds=1, node_wait=60)
    result = runner.run(LocalGrid(tmp_path, data, ["honest", "late"]), campaign, home)
    waits = [(e["have"], e["want"]) for e in events(home) if e["event"] == "waiting_for_nodes"]
    assert waits == [(1, 2)] and len(result["ledger"]) == 2
    campaign, data, home = setup(tmp_path / "alone", 1, rounds=1, node_wait=0.05)
    with pytest.raises(CommonsError,
                       match=r"^round 1: only 1 of min_nodes=2 volunteers could train after waiting 0s "
                             r"\(1 connected\): start more nodes, raise node_wait or lower min_nodes"):
        runner.run(LocalGrid(tmp_path / "alone", data, ["honest"]), campaign, home)


def test_a_volunteer_stopped_mid_round_is_waited_for_and_rejoins(tmp_path: Path, quick_polls: None) -> None:
    campaign, data, home = setup(tmp_path, 2, rounds=2, round_timeout=60)
    grid = LocalGrid(tmp_path, data, ["ctrlc@1", "honest"])
    result = runner.run(grid, campaign, home)
    log = events(home)
    assert ([e["event"] for e in log if e["event"] in ("waiting_for_rejoin", "rejoined")]
            == ["waiting_for_rejoin", "rejoined"])
    assert [e["accepted"] for e in log if e["event"] == "round_end"] == [2, 2]
    assert all(e["rounds"] == 2 for e in result["ledger"]) and grid.ids[0] == 200  # trained under its new id


def test_the_best_evaluated_round_is_published_and_early_stop_ends_the_campaign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modeling.load import TINY_ID, local_path, weights_sha256
    from protocol.signing.manifest import verify_directory
    from protocol.signing.trust import TrustPolicy

    scores = iter([0.10, 0.45, 0.35, 0.99])  # base, round 1, round 2; round 3 must never run

    def scripted(model: Any, tokenizer: Any, records: list[dict]) -> dict:
        return {"accuracy": next(scores), "n": len(records), "samples": [], "base_precision": "float32"}

    monkeypatch.setattr(runner, "exact_match", scripted)
    campaign, data, home = setup(tmp_path, 2, rounds=3, early_stop=1, eval_size=64)
    result = runner.run(LocalGrid(tmp_path, data, ["honest"] * 2), campaign, home)
    assert [e["round"] for e in events(home) if e["event"] == "round_end"] == [1, 2]
    assert next(e for e in events(home) if e["event"] == "early_stop")["best_round"] == 1
    meta = verify_directory(Path(result["adapter_dir"]), TrustPolicy(), record=False).meta
    assert meta.eval["published_round"] == 1 and meta.rounds == 1 and meta.eval["accuracy_adapter"] == 0.45
    assert meta.eval["published_because"] == ("round 1 scored best on the held-out set (45.0%); the last "
                                              "round, 2, scored 35.0%")
    assert meta.eval["n"] == 4  # the eval file holds 4 records, not eval_size = 64
    # the base pinned exactly: the local conversion's weights,
    # which `commons base path tiny` prints the folder of
    assert meta.base_revision == f"sha256:{weights_sha256(local_path(TINY_ID))}"
    assert json.loads((Path(result["adapter_dir"]) / "adapter_config.json").read_text())["revision"] is None
    assert (meta.eval["coverage"]["achieved"] == 2
            and "min_coverage = 3 but only 2" in meta.eval["coverage"]["note"])
    best = load_file(str(home / "campaigns" / "t" / "checkpoint" / "best-1.safetensors"))
    last = final_tensors(home)
    adapter = load_file(str(Path(result["adapter_dir"]) / "adapter_model.safetensors"))
    key = next(k for k in best if "lora_B" in k)
    assert np.array_equal(adapter[key], best[key]) and not np.array_equal(adapter[key], last[key])


def test_the_volunteers_are_told_how_the_campaign_ended(tmp_path: Path) -> None:
    campaign, data, home = setup(tmp_path, 2, rounds=1, shards="none", publish_margin=-1.0)
    grid = LocalGrid(tmp_path, data, ["honest"] * 2)
    result = runner.run(grid, campaign, home)
    for node_home in grid.homes:
        status = json.loads((node_home / "status.json").read_text())
        assert status["state"] == "ended" and status["campaign"] == "t"
        assert status["outcome"] == f"published t v{result['version']} ({result['adapter_cid'][:12]}…)"
    assert events(home)[-1]["event"] == "campaign_end"
