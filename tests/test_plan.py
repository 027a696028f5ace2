"""Shard plans: coverage, capability-sized spans, reassignment, JSON (aggregation: test_rules_sharded.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from coordinator.plan import (
    Plan,
    capability_score,
    layers_from_keys,
    make_plan,
    reassign,
    shard_keys,
)
from coordinator.rules.toolkit import split_key
from protocol.errors import CommonsError

KEY = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"
N_LAYERS = 30
KEYS = [KEY.format(i, m, ab) for i in range(N_LAYERS) for m in ("q_proj", "v_proj") for ab in "AB"]

GPU = {"device": "cuda", "vram_gb": 24.0, "cpu_cores": 8, "ram_gb": 64.0}
SMALL_GPU = {"device": "cuda", "vram_gb": 6.0, "cpu_cores": 4, "ram_gb": 16.0}
MAC = {"device": "mps", "vram_gb": None, "cpu_cores": 10, "ram_gb": 32.0}
CPU = {"device": "cpu", "vram_gb": None, "cpu_cores": 4, "ram_gb": 8.0}
BIG_CPU = {"device": "cpu", "vram_gb": None, "cpu_cores": 32, "ram_gb": 128.0}
MIX = [GPU, CPU, MAC, SMALL_GPU, CPU, BIG_CPU, GPU, MAC]


def nodes(n: int) -> dict[str, dict]:
    return {f"node-{i}": MIX[i] for i in range(n)}


@pytest.fixture(scope="module")
def layers() -> list[tuple[int, list[str]]]:
    return layers_from_keys(KEYS)


def check_spans(plan: Plan) -> None:
    """Each lane tiles the stack with contiguous, non-overlapping spans."""
    for lane in {s.lane for s in plan.shards}:
        spans = sorted((s.start, s.end) for s in plan.shards if s.lane == lane)
        assert spans[0][0] == 0 and spans[-1][1] == len(plan.layers) - 1
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))


def test_layers_are_grouped_by_index_in_stack_order() -> None:
    keys = [KEY.format(i, "q_proj", ab) for i in (10, 2, 1) for ab in "AB"] + [
        "base_model.model.lm_head.lora_A.weight",
        "base_model.model.lm_head.lora_B.weight",
        "base_model.model.model.norm.weight",
    ]
    got = layers_from_keys(keys)
    assert [i for i, _ in got] == [1, 2, 10, -1]
    assert got[0][1] == ["base_model.model.model.layers.1.self_attn.q_proj"]
    assert got[-1][1] == ["base_model.model.lm_head"]
    assert split_key("x.layers.0.q_proj.lora_B.default.weight") == ("x.layers.0.q_proj", "B")


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("min_coverage", [1, 2, 3])
def test_every_layer_is_covered_min_coverage_times_when_possible(layers, n: int, min_coverage: int) -> None:
    plan = make_plan(layers, nodes(n), min_coverage=min_coverage)
    assert sorted(s.node_id for s in plan.shards) == sorted(nodes(n))
    assert plan.coverage() == [min(n, min_coverage)] * N_LAYERS
    check_spans(plan)


def test_more_nodes_than_layers_adds_lanes(layers) -> None:
    few = layers[:3]
    plan = make_plan(few, nodes(8), min_coverage=2)
    assert min(plan.coverage()) >= 2 and sum(plan.coverage()) >= 8
    check_spans(plan)


def test_spans_follow_capability(layers) -> None:
    plan = make_plan(layers, {"gpu": SMALL_GPU, "cpu": CPU}, min_coverage=1)
    gpu, cpu = plan.shard("gpu"), plan.shard("cpu")
    assert gpu.start == 0  # the strongest node takes the bottom span (the deepest backward pass)
    assert (gpu.end - gpu.start + 1) > 5 * (cpu.end - cpu.start + 1)
    assert capability_score(GPU) > capability_score(SMALL_GPU) > capability_score(MAC) > capability_score(CPU)


def test_a_weak_node_still_gets_a_layer(layers) -> None:
    plan = make_plan(layers[:4], {"big": GPU, "a": CPU, "b": CPU, "c": CPU}, min_coverage=1)
    assert plan.coverage() == [1, 1, 1, 1] and all(s.end >= s.start for s in plan.shards)


@pytest.mark.parametrize("n", range(2, 9))
def test_reassign_keeps_coverage_complete_after_drops(layers, n: int) -> None:
    plan = make_plan(layers, nodes(n), min_coverage=2)
    rng = np.random.default_rng(n)
    for k in range(1, n):
        dropped = set(rng.choice(sorted(nodes(n)), size=k, replace=False).tolist())
        after = reassign(plan, dropped)
        assert {s.node_id for s in after.shards} == set(nodes(n)) - dropped
        assert min(after.coverage()) >= 1
        check_spans(after)
        for s in after.shards:  # survivors only grow: work already done is still wanted
            old = plan.shard(s.node_id)
            assert s.start <= old.start and s.end >= old.end


def test_reassign_within_a_lane_keeps_full_redundancy(layers) -> None:
    plan = make_plan(layers, nodes(6), min_coverage=2)
    lane0 = [s.node_id for s in plan.shards if s.lane == 0]
    assert len(lane0) >= 2
    assert reassign(plan, {lane0[0]}).coverage() == [2] * N_LAYERS


def test_everyone_dropping_out_says_what_to_do(layers) -> None:
    plan = make_plan(layers, nodes(3))
    with pytest.raises(CommonsError, match="wait for nodes to rejoin"):
        reassign(plan, set(nodes(3)))


def test_plan_errors_name_the_fix(layers) -> None:
    with pytest.raises(CommonsError, match="wait until at least one node has joined"):
        make_plan(layers, {})
    with pytest.raises(CommonsError, match="device must be one of cuda, mps, cpu"):
        make_plan(layers, {"x": {"device": "tpu", "cpu_cores": 1, "ram_gb": 1}})
    with pytest.raises(CommonsError, match="report cpu_cores, ram_gb, vram_gb"):
        make_plan(layers, {"x": {"device": "cpu", "cpu_cores": "many", "ram_gb": 1}})
    with pytest.raises(CommonsError, match="layers_from_keys"):
        make_plan([], nodes(2))


def test_json_is_canonical_and_round_trips(layers) -> None:
    plan = make_plan(layers, nodes(5), min_coverage=2)
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan and again.to_json() == text
    assert make_plan(layers, dict(reversed(list(nodes(5).items()))), min_coverage=2).to_json() == text
    assert " " not in text.replace("node-", "")


@pytest.mark.parametrize("text", ["{", '{"version": 9}', '{"version": 1, "layers": [], "shards": [{}]}'])
def test_bad_plan_json_is_refused(text: str) -> None:
    with pytest.raises(CommonsError, match="ask the coordinator for a fresh plan"):
        Plan.from_json(text)


def test_shard_keys_partition_every_lane(layers) -> None:
    plan = make_plan(layers, nodes(5), min_coverage=2)
    for lane in {s.lane for s in plan.shards}:
        keys = [k for s in plan.shards if s.lane == lane for k in shard_keys(plan, s.node_id, KEYS)]
        assert sorted(keys) == sorted(KEYS)  # each key exactly once per lane
    node = plan.shards[0].node_id
    assert all(split_key(k)[0] in plan.prefixes(node) for k in shard_keys(plan, node, KEYS))
    with pytest.raises(CommonsError, match="has no shard in this plan"):
        shard_keys(plan, "stranger", KEYS)


def test_a_node_whose_memory_cannot_hold_the_lowest_layers_gets_a_span_higher_up(layers) -> None:
    caps = {"big": GPU, "small": SMALL_GPU, "cpu": CPU}
    plan = make_plan(layers, caps, min_coverage=1, floors={"big": 0, "small": 20, "cpu": 0})
    check_spans(plan)
    assert plan.shard("big").start == 0 and plan.shard("small").start >= 20
    assert make_plan(layers, caps, min_coverage=1).to_json() == make_plan(
        layers, caps, min_coverage=1, floors=dict.fromkeys(caps, 0)).to_json()  # no limits: the same plan


def test_a_node_that_cannot_train_even_the_top_layer_gets_no_span(layers) -> None:
    floors = {"node-0": 0, "node-1": None, "node-2": 0, "node-3": 0}
    plan = make_plan(layers, nodes(4), min_coverage=2, floors=floors)
    check_spans(plan)
    assert "node-1" not in {s.node_id for s in plan.shards} and min(plan.coverage()) == 2


def test_a_plan_where_no_node_can_train_the_first_layer_is_refused_in_one_line(layers) -> None:
    with pytest.raises(CommonsError, match="no volunteer has the memory to train the lowest layers"):
        make_plan(layers, nodes(3), floors={"node-0": 5, "node-1": None, "node-2": 12})


def test_the_coordinator_sizes_spans_with_the_nodes_own_memory_estimate(tmp_path, layers) -> None:
    from coordinator.campaign import Campaign, TrainSpec
    from coordinator.plan import memory_floors

    mistral = str(Path(__file__).parent / "data" / "model_configs" / "Mistral-7B-v0.1")
    campaign = Campaign(name="c", base_model=mistral, eval_file=tmp_path / "eval.jsonl", quantization="nf4",
                        train=TrainSpec(batch_size=8, max_length=2048))
    caps = {"h100": {"device": "cuda", "vram_gb": 80.0, "bf16": True},
            "nine": {"device": "cuda", "vram_gb": 9.0, "bf16": True},
            "four": {"device": "cuda", "vram_gb": 4.0, "bf16": True}}
    floors = memory_floors(campaign, caps)
    assert floors["h100"] == 0 and 0 < floors["nine"] < 32 and floors["four"] is None
