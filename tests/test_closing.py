"""Rounds that close on time (coordinator/rounds.py `Closing`, coordinator/roster.py): against a fake Grid
with Flower's push/pull calls and a fake clock, volunteers answering at set times or never."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator import roster as roster_module
from coordinator import rounds
from coordinator.campaign import Campaign
from coordinator.plan import layers_from_keys, make_plan
from coordinator.roster import QUERY_GRACE, Roster
from protocol.instruction import Capability, NodeInfo, TrainInstruction
from protocol.packed import pack, unpack
from protocol.signing.keys import Identity
from protocol.update import encode, update_digest

KEY = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
CAPS = {"device": "cpu", "cpu_cores": 4, "ram_gb": 16.0}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.05)


class FakeGrid:
    """Flower's Grid calls; node `i` answers a train message `train_at[i]` seconds after it is pushed
    (None: never, as a SIGKILLed node whose heartbeat has not lapsed) and a query after `query_at[i]`."""

    def __init__(self, clock: Clock, train_at: dict[int, float | None],
                 query_at: dict[int, float | None] | None = None) -> None:
        self.clock, self.train_at = clock, train_at
        self.query_at = query_at or dict.fromkeys(train_at, 0.5)
        self.identities = {i: Identity.from_seed(i.to_bytes(32, "big")) for i in train_at}
        self.due: dict[str, tuple[float, Message]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.train_at)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            node = msg.metadata.dst_node_id
            delay = (self.query_at if msg.metadata.message_type == "query" else self.train_at)[node]
            if delay is not None:
                self.due[mid] = (self.clock.now + delay, msg)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        ready = [mid for mid in ids if mid in self.due and self.due[mid][0] <= self.clock.now]
        return [self.answer(self.due.pop(mid)[1]) for mid in ready]

    def answer(self, msg: Message) -> Message:
        me = self.identities[msg.metadata.dst_node_id]
        if msg.metadata.message_type == "query":
            info = NodeInfo(public_key=me.public_hex, capability=Capability.from_report(CAPS))
            return Message(RecordDict({"info": ConfigRecord(info.to_config())}), reply_to=msg)
        instruction = TrainInstruction.from_config(dict(msg.content["config"]))
        sent = {k: v for k, v in unpack({k: v.numpy() for k, v in msg.content["adapter"].items()}).items()
                if k in instruction.keys}
        wire = encode({k: v + 0.01 for k, v in sent.items()}, sent, "fp32")
        proof = {"public_key": me.public_hex,
                 "signature": me.sign(update_digest(instruction.campaign, instruction.round, wire)).hex()}
        return Message(RecordDict({"adapter": ArrayRecord({k: Array(v) for k, v in pack(wire).items()}),
                                   "metrics": ConfigRecord({"num_examples": 8, "loss": 1.0}),
                                   "proof": ConfigRecord(proof)}), reply_to=msg)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake.monotonic)
    monkeypatch.setattr(time, "sleep", fake.sleep)
    return fake


def adapter(layers: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {KEY.format(i, ab): rng.standard_normal((4, 8) if ab == "A" else (8, 4), dtype=np.float32)
            for i in range(layers) for ab in "AB"}


def one_exchange(clock: Clock, train_at: dict[int, float | None], quorum: int | None,
                 timeout: float = 300) -> tuple[dict, list[dict], float]:
    """Every node trains the whole adapter in one exchange; (verified updates, events, seconds taken)."""
    grid = FakeGrid(clock, train_at)
    said: list[dict] = []
    campaign = Campaign(name="c", base_model="tiny", eval_file=Path("-"), round_timeout=timeout)
    tensors = adapter()
    nodes = {grid.identities[i].public_hex: (i, CAPS) for i in train_at}
    work = dict.fromkeys(nodes, sorted(tensors))
    start = clock.now
    closing = rounds.Closing(start + timeout, quorum)
    def events(event: str, **fields) -> None:
        said.append({"event": event, **fields})

    got = rounds.train_nodes(grid, campaign, 1, tensors, work, nodes, events, "1", Roster(), closing)
    return got, said, clock.now - start


def test_a_round_closes_once_a_quorum_answered_and_the_others_had_as_long_again(clock: Clock) -> None:
    got, said, took = one_exchange(clock, {1: 10, 2: 10, 3: 10, 4: 18, 5: 40, 6: None}, quorum=3)
    assert len(got) == 4 and 20 <= took <= 22  # quorum at 10 s, as long again: closed at 20 s, not at 300
    late = [e for e in said if e["event"] == "node_missing"]
    assert len(late) == 2 and all(e["reason"].startswith("late: 4 of 6 answered (quorum 3 in 10s)")
                                  for e in late)


def test_a_round_short_of_its_quorum_waits_for_its_deadline_and_no_longer(clock: Clock) -> None:
    got, said, took = one_exchange(clock, {1: 5, 2: None, 3: None}, quorum=2, timeout=60)
    assert len(got) == 1 and 60 <= took <= 61
    reasons = [e["reason"] for e in said if e["event"] == "node_missing"]
    assert reasons == ["no reply by the round's deadline"] * 2


def test_a_quorum_that_answers_at_once_still_gives_the_others_a_few_seconds(clock: Clock) -> None:
    got, _, took = one_exchange(clock, {1: 0.1, 2: 0.1, 3: 3.0, 4: None}, quorum=2)
    assert len(got) == 3 and rounds.MIN_GRACE <= took <= rounds.MIN_GRACE + 1.5


def test_a_dead_node_still_listed_does_not_hold_up_a_round_start(clock: Clock) -> None:
    grid = FakeGrid(clock, {1: 1, 2: 1, 3: None}, query_at={1: 0.5, 2: 2.0, 3: None})
    start = clock.now
    infos = Roster().refresh(grid, grid.get_node_ids(), timeout=60)
    assert sorted(infos) == [1, 2] and clock.now - start <= QUERY_GRACE + 1.5


def test_a_volunteer_joining_mid_round_is_asked_at_once_and_answers_by_the_next_round(clock: Clock) -> None:
    grid = FakeGrid(clock, {1: 1, 2: 1})
    roster = Roster()
    assert sorted(roster.refresh(grid, [1], 60)) == [1]
    roster.update(grid, [1, 2], 60)  # a poll during the round: node 2 just connected, it is asked
    clock.sleep(1.0)
    assert sorted(roster.update(grid, [1, 2], 60)) == [1, 2]


def test_a_node_that_keeps_missing_deadlines_is_asked_for_less() -> None:
    roster = Roster()
    roster.missed("slow")
    roster.missed("slow")
    assert roster.pace(["slow", "ok"]) == {"slow": 0.25}
    for _ in range(5):
        roster.missed("slow")
    assert roster.pace(["slow"]) == {"slow": roster_module.SLOWEST_PACE}
    roster.kept("slow")
    assert roster.pace(["slow"]) == {}
    layers = layers_from_keys(adapter(8))
    plan = make_plan(layers, {"slow": CAPS, "ok": CAPS}, min_coverage=1, pace={"slow": 0.25})
    spans = {s.node_id: s.end - s.start + 1 for s in plan.shards}
    assert spans == {"ok": 6, "slow": 2}  # in proportion to 1 : 0.25 (largest remainder)


def test_only_the_spans_coverage_needs_are_handed_over() -> None:
    layers = layers_from_keys(adapter(4))
    caps = dict.fromkeys("abcdef", CAPS)
    plan = make_plan(layers, caps, min_coverage=3)  # 3 lanes of 2: every layer has 3 trainers
    a_lane = next(s.lane for s in plan.shards if s.node_id == "a")
    partner = next(s.node_id for s in plan.shards if s.lane == a_lane and s.node_id != "a")
    assert rounds.short_of(plan, ["a"], want=2) == []  # the two other lanes still give each layer 2
    assert rounds.short_of(plan, ["a"], want=3) == ["a"]
    assert sorted(rounds.short_of(plan, ["a", partner], want=2)) == []


WAITED: list[float] = []


def pull_objects(ids: list[str], max_time: float = 7200.0) -> list[str]:
    """Stands in for Flower's: records how long it was allowed to wait for a reply's arrays."""
    WAITED.append(max_time)
    return ids


class StuckGrid:
    """A Grid whose module pulls reply arrays as Flower 1.42's http_grid does (a module-level name)."""

    def pull_messages(self, ids: list[str]) -> list[str]:
        return pull_objects(ids)


def test_a_reply_whose_arrays_never_come_holds_the_round_only_until_its_deadline() -> None:
    WAITED.clear()
    assert roster_module.pull(StuckGrid(), ["m"], 42.0) == ["m"]
    assert roster_module.pull(StuckGrid(), ["m"], 0.5) == ["m"]
    assert WAITED == [42.0, roster_module.MIN_PULL]
    assert pull_objects.__defaults__ == (7200.0,) and StuckGrid().pull_messages(["x"]) == ["x"]
    assert WAITED[-1] == 7200.0  # put back afterwards


def test_a_volunteers_join_time_is_its_first_update_and_stays_so(tmp_path: Path) -> None:
    from node.settings import NodeSettings
    from node.worker import first_update

    settings = NodeSettings(home=tmp_path, data=tmp_path / "train.jsonl", started=time.time() - 42.0)
    first = first_update(settings)
    assert first is not None and 42.0 <= first < 60.0
    assert first_update(settings) == first  # a later round does not move it
    assert first_update(NodeSettings(home=tmp_path, data=tmp_path)) is None  # start unknown
