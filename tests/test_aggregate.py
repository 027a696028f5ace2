"""Aggregation rules, robust selection and central DP on small synthetic LoRA updates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from coordinator import privacy
from coordinator.rules import AggregateConfig, Update, aggregate
from coordinator.rules.exact import product_gap
from coordinator.rules.toolkit import capped_examples
from protocol.errors import CommonsError

KEY = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"
R, D_IN, D_OUT = 4, 20, 16


def make_global(rng: np.random.Generator, layers: int = 2, d_in: int = D_IN, d_out: int = D_OUT) -> dict:
    g = {}
    for layer in range(layers):
        for mod in ("q_proj", "v_proj"):
            g[KEY.format(layer, mod, "A")] = rng.normal(size=(R, d_in)).astype(np.float32)
            g[KEY.format(layer, mod, "B")] = (0.1 * rng.normal(size=(d_out, R))).astype(np.float32)
    return g


def honest_updates(g: dict, rng: np.random.Generator, n: int, spread: float = 0.02) -> list[Update]:
    """n nodes that moved in a common direction plus a little node-specific noise."""
    direction = {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
    return [
        Update(
            f"honest-{i}",
            {
                k: v + direction[k] + spread * rng.normal(size=v.shape).astype(np.float32)
                for k, v in g.items()
            },
            100,
        )
        for i in range(n)
    ]


def constant(g: dict, value: float, node: str, n: int = 100) -> Update:
    return Update(node, {k: np.full_like(v, value) for k, v in g.items()}, n)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture
def g(rng: np.random.Generator) -> dict:
    return make_global(rng)


# --- fedavg and validation -------------------------------------------------------------------------


def test_fedavg_weights_by_num_examples(g: dict) -> None:
    new, report = aggregate(g, [constant(g, 1.0, "a", 100), constant(g, 4.0, "b", 300)], "fedavg")
    for k in g:
        np.testing.assert_allclose(new[k], 3.25, rtol=1e-6)
    assert report.weights == {"a": 0.25, "b": 0.75}
    assert report.accepted == ["a", "b"]
    assert all(new[k] is not g[k] for k in g)


def test_unknown_rule_names_the_choices(g: dict) -> None:
    with pytest.raises(CommonsError, match="use one of fedavg, exact, robust"):
        aggregate(g, [], "mean")
    with pytest.raises(CommonsError, match="trimmed_mean, median, krum"):
        aggregate(g, [], "robust", AggregateConfig(combine="avg"))


@pytest.mark.parametrize("rule", ["fedavg", "exact", "robust"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_rejected_by_every_rule(
    g: dict, rng: np.random.Generator, rule: str, bad_value: float
) -> None:
    ups = honest_updates(g, rng, 4)
    poisoned = {k: v.copy() for k, v in ups[0].tensors.items()}
    poisoned[KEY.format(1, "v_proj", "B")][3, 1] = bad_value
    ups.append(Update("bad", poisoned, 100))
    new, report = aggregate(g, ups, rule)
    assert "NaN" in report.rejected["bad"] and "bad" not in report.accepted
    assert all(np.isfinite(v).all() for v in new.values())
    clean, _ = aggregate(g, ups[:4], rule)
    for k in g:
        np.testing.assert_allclose(new[k], clean[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: t.pop(KEY.format(0, "q_proj", "A")), "wrong keys: 1 missing"),
        (
            lambda t: t.update({"base_model.extra.lora_A.weight": np.zeros((R, 3), np.float32)}),
            "1 unexpected",
        ),
        (
            lambda t: t.update({KEY.format(0, "q_proj", "A"): np.zeros((R + 1, D_IN), np.float32)}),
            "shape (5, 20)",
        ),
        (lambda t: t.update({KEY.format(0, "q_proj", "B"): np.zeros((D_OUT, R), np.int64)}), "float array"),
    ],
)
def test_structurally_wrong_updates_are_rejected_with_a_reason(
    g: dict, rng: np.random.Generator, mutate, reason: str
) -> None:
    ups = honest_updates(g, rng, 3)
    mutate(ups[1].tensors)
    for rule in ("fedavg", "robust"):
        _, report = aggregate(g, ups, rule)
        assert reason in report.rejected["honest-1"]
        assert "\n" not in report.rejected["honest-1"]
        assert report.accepted == ["honest-0", "honest-2"]


@pytest.mark.parametrize("claim", [0, -5, 2.5, True, "100"])
def test_bad_num_examples_is_rejected(g: dict, claim: object) -> None:
    _, report = aggregate(
        g, [constant(g, 1.0, "a"), Update("b", constant(g, 2.0, "b").tensors, claim)], "fedavg"
    )
    assert "num_examples must be a positive integer" in report.rejected["b"]


def test_second_update_from_the_same_node_is_rejected(g: dict) -> None:
    new, report = aggregate(
        g, [constant(g, 1.0, "a"), constant(g, 9.0, "a"), constant(g, 3.0, "b")], "fedavg"
    )
    assert report.rejected == {"a": "sent more than one update this round"}
    np.testing.assert_allclose(new[KEY.format(0, "q_proj", "A")], 2.0)


def test_no_usable_update_keeps_the_global(g: dict) -> None:
    new, report = aggregate(g, [Update("x", {}, 10)])
    assert report.accepted == [] and report.unchanged == sorted(g)
    assert all(np.array_equal(new[k], g[k]) for k in g)


def test_broken_global_is_refused(g: dict) -> None:
    g[KEY.format(0, "q_proj", "A")][0, 0] = np.nan
    with pytest.raises(CommonsError, match="restore it from the last good round"):
        aggregate(g, [])


# --- robust: weight caps, clipping, selection ------------------------------------------------------


def test_claimed_examples_are_capped_at_max_and_at_k_times_median() -> None:
    claims = np.array([100, 120, 80, 10**9])
    assert capped_examples(claims, 10**6, 4.0).tolist() == [100, 120, 80, 440]
    assert capped_examples(claims, 90, 4.0).tolist() == [90, 90, 80, 90]


def test_a_huge_claim_buys_no_extra_weight(g: dict, rng: np.random.Generator) -> None:
    ups = honest_updates(g, rng, 4)
    ups[3].num_examples = 10**9
    _, report = aggregate(g, ups, "robust", AggregateConfig(combine="krum", krum_f=0))
    assert report.weights["honest-3"] == pytest.approx(400 / 700)  # capped at 4 × the median claim
    _, naive = aggregate(g, ups, "fedavg")
    assert naive.weights["honest-3"] > 0.999


def module_norms(g: dict, t: dict) -> dict[str, float]:
    """Parameter-delta norm of each LoRA module (A and B together)."""
    out: dict[str, float] = {}
    for k, v in g.items():
        prefix = k.rsplit(".lora_", 1)[0]
        out[prefix] = out.get(prefix, 0.0) + float(((t[k] - v) ** 2).sum())
    return {p: math.sqrt(v) for p, v in out.items()}


def test_oversized_update_is_clipped_per_module_to_the_median_bound(
    g: dict, rng: np.random.Generator
) -> None:
    ups = honest_updates(g, rng, 5)
    big = Update("big", {k: g[k] + 30 * (ups[0].tensors[k] - g[k]) for k in g}, 100)
    config = AggregateConfig(clip_factor=2.0, min_kept_ratio=0.0)  # judge nobody: only clipping acts
    new, report = aggregate(g, [*ups, big], "robust", config)
    norms = [module_norms(g, u.tensors) for u in [*ups, big]]
    bounds = {m: 2.0 * float(np.median([n[m] for n in norms])) for m in norms[0]}
    assert set(report.clipped) == {"big"} and report.accepted[-1] == "big"
    assert report.clipped["big"] == pytest.approx(min(bounds[m] / norms[-1][m] for m in bounds), rel=1e-4)
    for m, got in module_norms(g, new).items():
        assert got <= bounds[m] + 1e-5


def test_one_module_cannot_take_the_whole_norm_budget(g: dict, rng: np.random.Generator) -> None:
    ups = honest_updates(g, rng, 5)
    target = KEY.format(1, "v_proj", "B")
    sneaky = {k: v.copy() for k, v in ups[0].tensors.items()}
    sneaky[target] = g[target] + 25.0  # every other module looks perfectly honest
    config = AggregateConfig(min_kept_ratio=0.0)
    new, report = aggregate(g, [*ups, Update("sneaky", sneaky, 100)], "robust", config)
    honest_avg, _ = aggregate(g, ups, "fedavg")
    assert report.clipped["sneaky"] < 0.05
    assert float(np.abs(new[target] - honest_avg[target]).max()) < 0.2


def test_a_node_poisoning_one_module_loses_only_that_module(g: dict, rng: np.random.Generator) -> None:
    ups = honest_updates(g, rng, 6)
    target = "base_model.model.model.layers.1.self_attn.v_proj"
    sneaky = {k: v.copy() for k, v in ups[0].tensors.items()}
    for ab in "AB":
        k = f"{target}.lora_{ab}.weight"
        sneaky[k] = g[k] - 3 * (ups[0].tensors[k] - g[k])
    _, report = aggregate(g, [*ups, Update("sneaky", sneaky, 100)])
    assert "sneaky" in report.accepted and report.excluded == {"sneaky": 1}
    assert report.module_weights[target][-1] == 0.0
    assert all(w[-1] > 0 for m, w in report.module_weights.items() if m != target)


def test_fixed_clip_norm_overrides_the_median(g: dict, rng: np.random.Generator) -> None:
    ups = honest_updates(g, rng, 3)
    _, report = aggregate(g, ups, "robust", AggregateConfig(clip_norm=1e-3))
    assert report.clip_bound == 1e-3 and set(report.clipped) == {u.node_id for u in ups}


def attackers(g: dict, honest: list[Update], rng: np.random.Generator) -> list[Update]:
    ref = honest[0].tensors
    return [
        Update("flip", {k: g[k] - 3 * (ref[k] - g[k]) for k in g}, 100),
        Update(
            "noise", {k: g[k] + rng.normal(scale=0.5, size=g[k].shape).astype(np.float32) for k in g}, 100
        ),
    ]


@pytest.mark.parametrize("combine", ["trimmed_mean", "median", "krum"])
def test_robust_combines_reject_outliers(g: dict, rng: np.random.Generator, combine: str) -> None:
    honest = honest_updates(g, rng, 6)
    new, report = aggregate(
        g, [*honest, *attackers(g, honest, rng)], "robust", AggregateConfig(combine=combine)
    )
    assert set(report.rejected) == {"flip", "noise"}
    assert report.accepted == [u.node_id for u in honest]
    assert sum(report.weights.values()) == pytest.approx(1.0)
    want, _ = aggregate(g, honest, "fedavg")
    for k in g:
        np.testing.assert_allclose(new[k], want[k], atol=0.02)


@pytest.mark.parametrize("combine", ["trimmed_mean", "median"])
def test_honest_nodes_are_not_rejected(g: dict, rng: np.random.Generator, combine: str) -> None:
    _, report = aggregate(g, honest_updates(g, rng, 8), "robust", AggregateConfig(combine=combine))
    assert report.rejected == {} and report.excluded == {} and len(report.accepted) == 8


def test_krum_keeps_n_minus_f(g: dict, rng: np.random.Generator) -> None:
    honest = honest_updates(g, rng, 7)
    _, report = aggregate(g, [*honest, *attackers(g, honest, rng)], "robust", AggregateConfig(combine="krum"))
    assert len(report.accepted) == 9 - 3 and {"flip", "noise"} <= set(report.rejected)
    assert "multi-krum" in report.rejected["flip"]


def test_large_modules_are_judged_on_sampled_coordinates(rng: np.random.Generator) -> None:
    g = make_global(rng, layers=1, d_in=64, d_out=48)  # 3072 ΔW coordinates per module, view of 256
    honest = honest_updates(g, rng, 6)
    config = AggregateConfig(view_coords=256, seed=3)
    _, report = aggregate(g, [*honest, *attackers(g, honest, rng)], "robust", config)
    assert set(report.rejected) == {"flip", "noise"}


def test_fewer_than_three_updates_are_clipped_but_not_judged(g: dict, rng: np.random.Generator) -> None:
    _, report = aggregate(g, honest_updates(g, rng, 2), "robust")
    assert len(report.accepted) == 2 and all(math.isnan(s) for s in report.scores.values())


def test_report_is_json_ready(g: dict, rng: np.random.Generator) -> None:
    _, report = aggregate(g, honest_updates(g, rng, 4), "robust", AggregateConfig(exact=True))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["rule"] == "robust/trimmed_mean" and len(data["residuals"]) == 4
    assert data["residuals"]["base_model.model.model.layers.0.self_attn.q_proj"] == [D_OUT, D_IN]


# --- exact (FedEx-LoRA) vs naive ---------------------------------------------------------------------


def test_exact_reproduces_the_mean_of_products_and_fedavg_does_not(g: dict, rng: np.random.Generator) -> None:
    ups = honest_updates(g, rng, 5, spread=0.3)
    for i, u in enumerate(ups):
        u.num_examples = 50 * (i + 1)
    weights = np.array([u.num_examples for u in ups], dtype=np.float64)
    weights /= weights.sum()
    tensors = [u.tensors for u in ups]
    exact, report = aggregate(g, ups, "exact")
    naive, _ = aggregate(g, ups, "fedavg")
    assert product_gap(tensors, weights, exact, report.residuals) < 1e-5
    assert product_gap(tensors, weights, naive) > 1e-2
    for k in g:  # the adapter itself is the plain average; only the residual differs
        np.testing.assert_allclose(exact[k], naive[k], rtol=1e-6)
    assert {r.shape for r in report.residuals.values()} == {(D_OUT, D_IN)}


def test_robust_exact_applies_fedex_over_the_accepted_nodes(g: dict, rng: np.random.Generator) -> None:
    honest = honest_updates(g, rng, 6, spread=0.1)
    new, report = aggregate(g, [*honest, *attackers(g, honest, rng)], "robust", AggregateConfig(exact=True))
    assert set(report.rejected) == {"flip", "noise"} and "flip" in report.clipped
    assert not set(report.clipped) & {u.node_id for u in honest}
    assert report.accepted == [u.node_id for u in honest]
    gap = product_gap([u.tensors for u in honest], report.module_weights, new, report.residuals)
    assert gap < 1e-5


# --- central DP -------------------------------------------------------------------------------------


def test_rdp_full_participation_matches_the_closed_form() -> None:
    # ε = min_α α/(2σ²) + log(1/δ)/(α−1) = 1/(2σ²) + sqrt(2 log(1/δ))/σ at the continuous optimum
    for sigma, delta in [(1.0, 1e-5), (2.0, 1e-6)]:
        eps, _ = privacy.epsilon(sigma, 1, delta)
        best = 1 / (2 * sigma**2) + math.sqrt(2 * math.log(1 / delta)) / sigma
        assert best <= eps <= best * 1.001
    assert privacy.epsilon(1.0, 4, 1e-5)[0] == pytest.approx(privacy.epsilon(0.5, 1, 1e-5)[0], rel=1e-9)


def test_rdp_sampled_gaussian_matches_tensorflow_privacy_values() -> None:
    # reference values from TF Privacy's rdp_accountant tests
    assert 10 * privacy.rdp_sampled_gaussian(0.1, 2.0, 5) == pytest.approx(0.07737, abs=1e-5)
    got = [50 * privacy.rdp_sampled_gaussian(0.01, 2.5, a) for a in (5, 50, 100)]
    assert got == pytest.approx([0.00218075, 0.023846, 167.416307], abs=1e-5)
    eps, order = privacy.epsilon(4.0, 10_000, 1e-5, sampling_rate=0.01)
    assert eps == pytest.approx(1.258575, abs=1e-5) and order == 20


def test_rdp_sampled_gaussian_matches_numerical_integration() -> None:
    q, sigma, alpha = 0.2, 1.5, 6
    z = np.linspace(-30, 30, 600_001)
    mu0 = np.exp(-(z**2) / (2 * sigma**2))
    mu = (1 - q) * mu0 + q * np.exp(-((z - 1) ** 2) / (2 * sigma**2))
    a = np.trapezoid(mu0 * (mu / mu0) ** alpha, z) / (sigma * math.sqrt(2 * math.pi))
    assert privacy.rdp_sampled_gaussian(q, sigma, alpha) == pytest.approx(math.log(a) / (alpha - 1), rel=1e-6)


def test_dp_aggregate_adds_calibrated_noise_and_reports_epsilon(g: dict, rng: np.random.Generator) -> None:
    ups = honest_updates(g, rng, 4)
    dp = privacy.DPConfig(clip=0.5, noise_multiplier=2.0, delta=1e-5, rounds=20)
    new, report = aggregate(g, ups, "fedavg", AggregateConfig(dp=dp, seed=1))
    norms = [math.sqrt(sum(float(((u.tensors[k] - g[k]) ** 2).sum()) for k in g)) for u in ups]
    clipped = {
        k: g[k] + sum(min(1, 0.5 / n) * (u.tensors[k] - g[k]) for u, n in zip(ups, norms)) / 4 for k in g
    }
    noise = np.concatenate([(new[k] - clipped[k]).ravel() for k in g])
    assert report.dp["noise_std"] == 1.0 and report.dp["participants"] == 4
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.1)
    assert report.dp["epsilon"] == pytest.approx(privacy.epsilon(2.0, 20, 1e-5)[0])
    assert set(report.clipped) == {u.node_id for u in ups}  # every honest delta is > 0.5 here


def test_dp_is_refused_for_the_exact_residual(g: dict) -> None:
    dp = privacy.DPConfig(clip=1.0, noise_multiplier=1.0)
    with pytest.raises(CommonsError, match="use rule 'fedavg' or 'robust' without exact"):
        aggregate(g, [], "exact", AggregateConfig(dp=dp))


def test_bad_dp_settings_name_the_fix() -> None:
    with pytest.raises(CommonsError, match="noise_multiplier must be > 0"):
        privacy.epsilon(0.0, 10, 1e-5)
    with pytest.raises(CommonsError, match="delta must be in"):
        privacy.epsilon(1.0, 10, 2.0)
