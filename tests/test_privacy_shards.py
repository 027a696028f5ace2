"""Central DP with shards = "auto": a node's whole upload is clipped jointly, every part's sum gets noise
of std σC (σC/denominator on the average), and the reported ε equals the whole-adapter case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.campaign import load
from coordinator.plan import Plan, Shard, layers_from_keys
from coordinator.privacy import DPConfig, epsilon
from coordinator.rules import AggregateConfig, Update, aggregate
from coordinator.rules.sharded import aggregate_sharded
from protocol.errors import CommonsError

KEY = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
KEYS = [KEY.format(i, ab) for i in range(2) for ab in "AB"]


def global_adapter(rank: int = 4, dim: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i in range(2):
        out[KEY.format(i, "A")] = rng.standard_normal((rank, dim)).astype(np.float32)
        out[KEY.format(i, "B")] = rng.standard_normal((dim, rank)).astype(np.float32)
    return out


def plan_over_two_parts() -> Plan:
    """`a` trains both layers (lane 0); `b` layer 0, `c` and `d` layer 1: a's upload spans two parts,
    with 2 contributors in layer 0 and 3 in layer 1."""
    shards = [Shard("a", 0, 0, 1, 1.0), Shard("b", 1, 0, 0, 1.0), Shard("c", 1, 1, 1, 1.0),
              Shard("d", 2, 1, 1, 1.0)]
    return Plan(layers_from_keys(KEYS), shards, 2)


def layer_keys(i: int) -> list[str]:
    return [KEY.format(i, ab) for ab in "AB"]


def moved(g: dict[str, np.ndarray], keys: list[str], delta: float) -> dict[str, np.ndarray]:
    """The global tensors for `keys`, each coordinate moved by `delta`."""
    return {k: g[k] + np.float32(delta) for k in keys}


def test_clipping_is_joint_across_a_nodes_parts() -> None:
    g = global_adapter()
    per_layer = float(np.sqrt(sum(g[k].size for k in layer_keys(0))))  # norm of a unit move of one layer
    clip = 1.0
    updates = [
        Update("a", moved(g, KEYS, 0.9 * clip / per_layer), 10),  # 0.9 C in each part, 1.27 C in total
        Update("b", moved(g, layer_keys(0), 0.0), 10),
        Update("c", moved(g, layer_keys(1), 0.0), 10),
        Update("d", moved(g, layer_keys(1), 0.0), 10),
    ]
    dp = DPConfig(clip=clip, noise_multiplier=1e-9, rounds=1)
    new, report = aggregate_sharded(g, updates, plan_over_two_parts(), "fedavg",
                                    AggregateConfig(dp=dp, seed=1))
    factor = 1.0 / np.sqrt(2 * 0.9**2)  # the joint norm is sqrt(2)·0.9·C: scaled down to C
    assert report.clipped["a"] == pytest.approx(factor, rel=1e-5)
    a_move = 0.9 * clip / per_layer * factor
    for k in layer_keys(0):  # a and b, equal weights
        np.testing.assert_allclose(new[k] - g[k], a_move / 2, rtol=1e-4)
    for k in layer_keys(1):  # a, c and d
        np.testing.assert_allclose(new[k] - g[k], a_move / 3, rtol=1e-4)
    # Per-part clipping would not have touched a (0.9 C per part): the two results differ.
    assert not np.allclose(new[layer_keys(0)[0]] - g[layer_keys(0)[0]], 0.9 * clip / per_layer / 2, rtol=1e-3)


def test_a_node_with_non_finite_values_is_rejected_in_every_part() -> None:
    g = global_adapter()
    bad = moved(g, KEYS, 0.0)
    bad[KEYS[3]] = bad[KEYS[3]].copy()
    bad[KEYS[3]][0, 0] = np.nan
    updates = [Update("a", bad, 10), Update("b", moved(g, layer_keys(0), 0.1), 10),
               Update("c", moved(g, layer_keys(1), 0.1), 10), Update("d", moved(g, layer_keys(1), 0.1), 10)]
    dp = DPConfig(clip=1.0, noise_multiplier=1e-9)
    new, report = aggregate_sharded(g, updates, plan_over_two_parts(), "robust",
                                    AggregateConfig(dp=dp, seed=0))
    assert "NaN" in report.rejected["a"] and "a" not in report.accepted
    assert all(np.isfinite(v).all() for v in new.values())


@pytest.mark.parametrize("rule", ["fedavg", "robust"])
def test_noise_std_per_coordinate_is_sigma_clip_over_the_parts_denominator(rule: str) -> None:
    g = global_adapter(rank=16, dim=512)  # 16k coordinates per layer: the std is measured to about 1%
    sigma, clip = 1.5, 0.2
    updates = [Update("a", moved(g, KEYS, 0.0), 10), Update("b", moved(g, layer_keys(0), 0.0), 10),
               Update("c", moved(g, layer_keys(1), 0.0), 10), Update("d", moved(g, layer_keys(1), 0.0), 10)]
    dp = DPConfig(clip=clip, noise_multiplier=sigma)
    new, report = aggregate_sharded(g, updates, plan_over_two_parts(), rule, AggregateConfig(dp=dp, seed=7))
    noise = {i: np.concatenate([(new[k] - g[k]).ravel() for k in layer_keys(i)]) for i in range(2)}
    assert np.std(noise[0]) == pytest.approx(sigma * clip / 2, rel=0.03)  # a and b
    assert np.std(noise[1]) == pytest.approx(sigma * clip / 3, rel=0.03)  # a, c and d
    assert abs(np.mean(noise[0])) < 0.05 * sigma * clip / 2
    # Each part draws its own noise, even with one seed: independent across the adapter.
    assert abs(np.corrcoef(noise[0], noise[1])[0, 1]) < 0.05
    assert sorted(report.accepted) == ["a", "b", "c", "d"] and report.dp["parts"] == 2


def test_reported_epsilon_for_shards_equals_the_whole_adapter_case() -> None:
    g = global_adapter()
    dp = DPConfig(clip=1.0, noise_multiplier=1.1, delta=1e-5, rounds=20)
    sharded = [Update("a", moved(g, KEYS, 0.01), 10), Update("b", moved(g, layer_keys(0), 0.02), 10),
               Update("c", moved(g, layer_keys(1), 0.03), 10), Update("d", moved(g, layer_keys(1), 0.0), 10)]
    _, shard_report = aggregate_sharded(g, sharded, plan_over_two_parts(), "robust", AggregateConfig(dp=dp))
    whole = [Update(n, moved(g, KEYS, 0.01 * i), 10) for i, n in enumerate("abcd")]
    _, whole_report = aggregate(g, whole, "robust", AggregateConfig(dp=dp))
    eps, _ = epsilon(1.1, 20, 1e-5)
    assert shard_report.dp["epsilon"] == whole_report.dp["epsilon"] == eps
    assert eps == pytest.approx(27.78, abs=0.02)  # min over α of 20α/(2·1.1²) + ln(1e5)/(α−1)
    for field in ("delta", "noise_std", "rounds", "clip"):
        assert shard_report.dp[field] == whole_report.dp[field]


def write_campaign(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "test.jsonl").write_text("{}\n")
    path = tmp_path / "c.toml"
    path.write_text(f'name = "x"\nbase_model = "tiny"\neval_file = "test.jsonl"\n{extra}'
                    "[dp]\nnoise_multiplier = 1.0\nclip = 0.5\n")
    return path


def test_a_campaign_with_dp_and_auto_shards_loads(tmp_path: Path) -> None:
    campaign = load(write_campaign(tmp_path, 'shards = "auto"\naggregation = "robust"\n'))
    assert campaign.shards == "auto" and campaign.dp is not None and campaign.dp.clip == 0.5


def test_a_campaign_with_dp_and_the_exact_rule_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(CommonsError) as err:
        load(write_campaign(tmp_path, 'aggregation = "exact"\n'))
    message = str(err.value)
    assert "\n" not in message and "residual" in message and 'aggregation = "robust"' in message
