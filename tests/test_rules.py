"""The rule registry: every rule and combine is listed, unknown names fail in one line naming the choices,
and what a rule carries across rounds survives a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator import checkpoint
from coordinator.campaign import load
from coordinator.rules import COMBINES, RULES, AggregateConfig, Carry, Update, aggregate, create, get
from coordinator.rules.exact import PREFIX, Residual
from protocol.errors import CommonsError

KEY = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"


def adapter(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {KEY.format(i, ab): rng.normal(size=(2, 6) if ab == "A" else (5, 2)).astype(np.float32)
            for i in range(2) for ab in "AB"}


def updates(g: dict[str, np.ndarray], rng: np.random.Generator, n: int = 4) -> list[Update]:
    return [Update(f"n{i}", {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32)
                             for k, v in g.items()}, 10)
            for i in range(n)]


def write_campaign(tmp_path: Path, line: str) -> Path:
    (tmp_path / "test.jsonl").write_text("{}\n")
    path = tmp_path / "c.toml"
    path.write_text(f'name = "x"\nbase_model = "tiny"\neval_file = "test.jsonl"\n{line}\n')
    return path


@pytest.mark.parametrize("name", ["fedavg", "exact", "robust"])
def test_each_rule_is_in_the_registry_under_its_own_name(name: str) -> None:
    assert name in RULES and get(name) is RULES[name] and RULES[name].name == name
    assert create(name).config == AggregateConfig()


@pytest.mark.parametrize("name", ["fedavg", "exact", "robust"])
def test_a_campaign_file_takes_each_registered_rule(tmp_path: Path, name: str) -> None:
    assert load(write_campaign(tmp_path, f'aggregation = "{name}"')).aggregation == name


@pytest.mark.parametrize("combine", ["trimmed_mean", "median", "krum"])
def test_each_robust_combine_is_in_the_registry(combine: str) -> None:
    assert combine in COMBINES
    assert create("robust", AggregateConfig(combine=combine)).label() == f"robust/{combine}"


def test_an_unknown_rule_in_a_campaign_file_is_one_line_listing_the_choices(tmp_path: Path) -> None:
    with pytest.raises(CommonsError) as err:
        load(write_campaign(tmp_path, 'aggregation = "mean"'))
    message = str(err.value)
    assert "\n" not in message and "'mean'" in message
    assert f"use one of {', '.join(RULES)}" in message


def test_an_unknown_rule_or_combine_in_code_is_one_line_listing_the_choices() -> None:
    with pytest.raises(CommonsError,
                       match=f"^unknown aggregation rule 'mean'; use one of {', '.join(RULES)}$"):
        create("mean")
    with pytest.raises(CommonsError,
                       match=f"^unknown robust combine 'avg'; use one of {', '.join(COMBINES)}$"):
        create("fedavg", AggregateConfig(combine="avg"))


@pytest.mark.parametrize(("name", "exact"), [("fedavg", False), ("robust", False), ("exact", True)])
def test_only_a_rule_keeping_a_residual_carries_state(name: str, exact: bool) -> None:
    rule = create(name)
    assert rule.keeps_residual() is exact
    assert isinstance(rule.carry(2.0), Residual) is exact and isinstance(rule.carry(2.0), Carry)
    assert isinstance(create("robust", AggregateConfig(exact=True)).carry(2.0), Residual)


def test_the_exact_residual_survives_a_checkpoint_and_keeps_adding_up(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    g = adapter(rng)
    carry = create("exact").carry(2.0)
    new, report = aggregate(g, updates(g, rng), "exact")
    carry.absorb(report)
    state = checkpoint.save(tmp_path, carry.checkpoint(new), {"round": 1, "fingerprint": "f"})
    saved, _ = checkpoint.load(tmp_path, "f")
    again = create("exact").carry(2.0)
    restored = again.restore(saved)
    assert state["round"] == 1 and restored.keys() == new.keys()
    assert all(np.array_equal(restored[k], new[k]) for k in new)
    assert again.checkpoint(restored).keys() == carry.checkpoint(new).keys()
    _, second = aggregate(new, updates(new, rng), "exact")
    again.absorb(second)
    for name, r in report.residuals.items():
        np.testing.assert_allclose(again.checkpoint(restored)[PREFIX + name], r + second.residuals[name],
                                   rtol=1e-6)


@pytest.mark.parametrize("name", ["fedavg", "robust"])
def test_a_rule_without_state_checkpoints_just_the_adapter(name: str) -> None:
    rng = np.random.default_rng(1)
    g = adapter(rng)
    carry = create(name).carry(2.0)
    new, report = aggregate(g, updates(g, rng), name)
    carry.absorb(report)
    assert carry.checkpoint(new) is new and carry.restore(new) is new and carry.published(None, new) is None
