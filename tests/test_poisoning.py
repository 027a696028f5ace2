"""One poisoned node out of four, on a federated LoRA least-squares problem (numpy only).

Each of 2 "layers" is a linear map y = (W0 + B A) x with a frozen W0; the data come from W0 + U V (rank 2)
plus noise. Four nodes hold different samples, run a few local gradient steps on A and B from the
global adapter, and the coordinator aggregates. The loss floor is the noise variance.
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator import outer
from coordinator.outer import OuterConfig
from coordinator.rules import AggregateConfig, Update, aggregate

D, R, LAYERS, NOISE = 24, 4, 2, 0.3
ROUNDS, LOCAL_STEPS, LR = 30, 5, 0.5
KEY = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"


def make_problem(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w0 = [rng.normal(size=(D, D)) / np.sqrt(D) for _ in range(LAYERS)]
    target = [w + rng.normal(size=(D, 2)) @ rng.normal(size=(2, D)) / np.sqrt(2 * D) for w in w0]

    def sample(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        xs = [rng.normal(size=(n, D)) for _ in range(LAYERS)]
        return [(x, x @ t.T + NOISE * rng.normal(size=(n, D))) for x, t in zip(xs, target)]

    init = {}
    for layer in range(LAYERS):
        init[KEY.format(layer, "A")] = (rng.normal(size=(R, D)) / np.sqrt(D)).astype(np.float32)
        init[KEY.format(layer, "B")] = np.zeros((D, R), np.float32)  # PEFT initialises B to zero
    return {"w0": w0, "nodes": [sample(150) for _ in range(4)], "test": sample(2000), "init": init}


def loss(p: dict, tensors: dict, data: list) -> float:
    total = 0.0
    for layer, (x, y) in enumerate(data):
        w = p["w0"][layer] + tensors[KEY.format(layer, "B")] @ tensors[KEY.format(layer, "A")]
        total += float(np.mean((y - x @ w.T) ** 2))
    return total / LAYERS


def local_train(p: dict, global_t: dict, data: list) -> dict:
    t = {k: v.astype(np.float64) for k, v in global_t.items()}
    for _ in range(LOCAL_STEPS):
        for layer, (x, y) in enumerate(data):
            a, b = t[KEY.format(layer, "A")], t[KEY.format(layer, "B")]
            resid = x @ (p["w0"][layer] + b @ a).T - y
            grad_w = 2.0 * resid.T @ x / resid.size
            t[KEY.format(layer, "A")] = a - LR * b.T @ grad_w
            t[KEY.format(layer, "B")] = b - LR * grad_w @ a.T
    return {k: v.astype(np.float32) for k, v in t.items()}


def poison(attack: str, global_t: dict, honest: dict, rng: np.random.Generator) -> dict:
    if attack == "scale50":
        return {k: global_t[k] + 50 * (honest[k] - global_t[k]) for k in global_t}
    if attack == "sign_flip":  # boosted ×4 so that it outweighs the three honest nodes under fedavg
        return {k: global_t[k] - 4 * (honest[k] - global_t[k]) for k in global_t}
    if attack == "noise":
        return {k: v + rng.normal(scale=1.0, size=v.shape).astype(np.float32) for k, v in global_t.items()}
    if attack == "nan":
        return {k: np.full_like(v, np.nan) for k, v in global_t.items()}
    raise AssertionError(attack)


def run(
    p: dict, rule: str, attack: str | None, nodes: int = 4, config: AggregateConfig | None = None,
    step: OuterConfig | None = None,
) -> float:
    """Final test loss after ROUNDS rounds; node `nodes - 1` runs `attack`; `step`: the coordinator's outer
    optimizer after each aggregation (none by default: the rule alone)."""
    rng = np.random.default_rng(1)
    global_t, moments = dict(p["init"]), {}
    for _ in range(ROUNDS):
        updates = []
        for i in range(nodes):
            with np.errstate(all="ignore"):  # naive fedavg under attack overflows on purpose
                t = local_train(p, global_t, p["nodes"][i])
            if attack and i == nodes - 1:
                t = poison(attack, global_t, t, rng)
            updates.append(Update(f"node-{i}", t, 150))
        new, report = aggregate(global_t, updates, rule, config)
        global_t, moments = outer.step(global_t, new, moments, step or OuterConfig("none"), report.unchanged)
    with np.errstate(all="ignore"):
        return loss(p, global_t, p["test"])


@pytest.fixture(scope="module")
def problem() -> dict:
    return make_problem()


@pytest.fixture(scope="module")
def honest(problem: dict) -> float:
    """The reference: the three honest nodes alone, plain FedAvg."""
    return run(problem, "fedavg", None, nodes=3)


def test_training_actually_learns(problem: dict, honest: float) -> None:
    start = loss(problem, problem["init"], problem["test"])
    assert honest < 0.2 * start
    assert honest < 1.5 * NOISE**2  # near the noise floor, so a 2 % margin is meaningful


def test_robust_matches_fedavg_without_attack(problem: dict) -> None:
    assert run(problem, "robust", None) == pytest.approx(run(problem, "fedavg", None), rel=0.02)


@pytest.mark.parametrize("attack", ["scale50", "sign_flip", "noise", "nan"])
def test_default_robust_rule_survives_one_poisoned_node(problem: dict, honest: float, attack: str) -> None:
    attacked = run(problem, "robust", attack)
    assert attacked == pytest.approx(honest, rel=0.02)


@pytest.mark.parametrize("attack", ["scale50", "sign_flip", "noise"])
def test_naive_fedavg_fails_under_the_same_attack(problem: dict, honest: float, attack: str) -> None:
    attacked = run(problem, "fedavg", attack)
    assert not np.isfinite(attacked) or attacked > 3 * honest


def test_nan_node_is_refused_even_by_fedavg(problem: dict, honest: float) -> None:
    # NaN would poison the model for everyone, so every rule rejects it (see coordinator.rules.toolkit)
    attacked = run(problem, "fedavg", "nan")
    assert np.isfinite(attacked) and attacked == pytest.approx(honest, rel=0.02)


@pytest.mark.parametrize("combine", ["median", "krum"])
@pytest.mark.parametrize("attack", ["scale50", "sign_flip", "noise"])
def test_other_robust_combines_survive_too(problem: dict, honest: float, combine: str, attack: str) -> None:
    attacked = run(problem, "robust", attack, config=AggregateConfig(combine=combine))
    assert attacked == pytest.approx(honest, rel=0.02)


@pytest.mark.parametrize("step", [OuterConfig(), OuterConfig("nesterov", lr=0.7, momentum=0.9)],
                         ids=["default", "nesterov"])
@pytest.mark.parametrize("attack", ["scale50", "sign_flip", "noise", "nan"])
def test_an_outer_step_after_the_rule_keeps_the_robust_guarantee(problem: dict, attack: str,
                                                                 step: OuterConfig) -> None:
    """The outer optimizer (a campaign file without [outer] gets the default) moves the robust aggregate
    further, attacked or not: the attacked run still ends within 2 % of the honest nodes alone under the
    same step."""
    honest = run(problem, "fedavg", None, nodes=3, step=step)
    assert honest < 1.5 * NOISE**2
    assert run(problem, "robust", attack, step=step) == pytest.approx(honest, rel=0.02)
