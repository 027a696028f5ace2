"""Aggregation under a shard plan: each key over the nodes whose shard covers it, strangers refused."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.plan import Plan, layers_from_keys, make_plan, reassign, shard_keys
from coordinator.rules import Update
from coordinator.rules.sharded import aggregate_sharded

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


def global_adapter() -> dict[str, np.ndarray]:
    return {k: np.zeros((4, 8) if k.endswith("A.weight") else (8, 4), np.float32) for k in KEYS}


def node_update(plan: Plan, node: str, value: float, n: int = 100) -> Update:
    return Update(
        node,
        {
            k: np.full((4, 8) if k.endswith("A.weight") else (8, 4), value, np.float32)
            for k in shard_keys(plan, node, KEYS)
        },
        n,
    )


def test_each_key_is_averaged_over_the_nodes_that_trained_it(layers) -> None:
    plan = make_plan(layers, nodes(5), min_coverage=2)
    values = {nid: float(i + 1) for i, nid in enumerate(sorted(nodes(5)))}
    ups = [node_update(plan, nid, v) for nid, v in values.items()]
    new, report = aggregate_sharded(global_adapter(), ups, plan, "fedavg")
    for k in KEYS:
        owners = [s.node_id for s in plan.shards if k in shard_keys(plan, s.node_id, KEYS)]
        np.testing.assert_allclose(new[k], np.mean([values[o] for o in owners]))
    assert report.accepted == sorted(nodes(5)) and report.rejected == {} and report.unchanged == []
    assert len(report.parts) >= 2


def test_sharded_rejects_strangers_and_out_of_shard_keys(layers) -> None:
    plan = make_plan(layers, nodes(4), min_coverage=2)
    a, b = [s.node_id for s in plan.shards if s.end - s.start + 1 < N_LAYERS][:2]
    wrong = node_update(plan, a, 5.0)
    outside = next(k for k in KEYS if k not in wrong.tensors)
    wrong.tensors[outside] = np.zeros((8, 4), np.float32)
    ups = [wrong, node_update(plan, b, 1.0), Update("stranger", {}, 10)]
    new, report = aggregate_sharded(global_adapter(), ups, plan, "robust")
    assert "send exactly the plan's keys" in report.rejected[a]
    assert "fetch the current plan" in report.rejected["stranger"]
    assert report.accepted == [b]
    mine = set(shard_keys(plan, b, KEYS))
    assert all(float(new[k].mean()) == (1.0 if k in mine else 0.0) for k in KEYS)
    assert set(report.unchanged) == set(KEYS) - mine


def test_sharded_after_reassign_covers_the_dropped_layers(layers) -> None:
    plan = make_plan(layers, nodes(4), min_coverage=1)
    dropped = plan.shards[1].node_id
    after = reassign(plan, {dropped})
    ups = [node_update(after, s.node_id, 2.0) for s in after.shards]
    new, report = aggregate_sharded(global_adapter(), ups, after, "robust")
    assert report.unchanged == [] and all(np.allclose(new[k], 2.0) for k in KEYS)
