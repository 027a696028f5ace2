"""The coordinator's outer optimizer (coordinator/outer.py): pure functions over the adapter's arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator import checkpoint, outer, runner
from coordinator.campaign import load
from coordinator.outer import OuterConfig
from protocol.errors import CommonsError

A, B = "layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"


def arrays(a: float, b: float) -> dict[str, np.ndarray]:
    return {A: np.full((2, 3), a, np.float32), B: np.full((3, 2), b, np.float32)}


def test_nesterov_at_lr_1_and_no_momentum_is_plain_averaging() -> None:
    g, agg = arrays(1.0, 0.0), arrays(1.5, -0.25)
    new, _ = outer.step(g, agg, {}, OuterConfig("nesterov", lr=1.0, momentum=0.0))
    assert all(np.array_equal(new[k], agg[k]) for k in g)
    none, kept = outer.step(g, agg, {"momentum." + A: np.ones((2, 3))}, OuterConfig("none"))
    assert all(np.array_equal(none[k], agg[k]) for k in g) and list(kept) == ["momentum." + A]


def test_nesterov_momentum_follows_the_update_rule_over_two_rounds() -> None:
    config = OuterConfig("nesterov", lr=0.5, momentum=0.9)
    g0 = arrays(0.0, 0.0)
    g1, state = outer.step(g0, arrays(1.0, 2.0), {}, config)  # Δ = (1, 2); m = Δ
    assert g1[A][0, 0] == pytest.approx(0.5 * (1 + 0.9 * 1))
    assert g1[B][0, 0] == pytest.approx(0.5 * (2 + 0.9 * 2))
    agg = {k: g1[k] + 0.1 for k in g1}  # Δ = 0.1 everywhere; m = 0.9·m + Δ
    g2, state = outer.step(g1, agg, state, config)
    m = 0.9 * 1 + 0.1
    assert state["momentum." + A][0, 0] == pytest.approx(m)
    assert g2[A][0, 0] == pytest.approx(g1[A][0, 0] + 0.5 * (0.1 + 0.9 * m))


def test_adam_takes_a_step_of_about_lr_per_coordinate_the_first_round() -> None:
    g = arrays(0.0, 0.0)
    new, state = outer.step(g, arrays(1e-2, -1e-3), {}, OuterConfig("adam", lr=1e-3, eps=1e-8))
    assert new[A][0, 0] == pytest.approx(1e-3, rel=1e-4) and new[B][0, 0] == pytest.approx(-1e-3, rel=1e-4)
    assert state["steps." + A][0] == 1


def test_keys_nobody_updated_are_left_alone_momentum_included() -> None:
    config = OuterConfig("nesterov", lr=0.7, momentum=0.9)
    g1, state = outer.step(arrays(0.0, 0.0), arrays(1.0, 1.0), {}, config)
    before = {k: v.copy() for k, v in state.items()}
    agg = {A: g1[A] + 1.0, B: g1[B].copy()}  # B's span was trained by nobody this round
    g2, after = outer.step(g1, agg, state, config, untouched=[B])
    assert np.array_equal(g2[B], g1[B]) and np.array_equal(after["momentum." + B], before["momentum." + B])
    assert not np.array_equal(after["momentum." + A], before["momentum." + A])
    assert np.array_equal(state["momentum." + A], before["momentum." + A])  # the input is not changed


def test_the_state_survives_a_round_checkpoint(tmp_path: Path) -> None:
    config = OuterConfig("adam", lr=1e-2)
    g1, state = outer.step(arrays(0.0, 0.0), arrays(0.1, -0.2), {}, config)
    checkpoint.save(tmp_path, outer.join(g1, state), {"round": 1, "fingerprint": "f"})
    saved, _ = checkpoint.load(tmp_path, "f")
    tensors, restored = outer.split(saved)
    assert set(tensors) == {A, B} and set(restored) == set(state)
    agg = {k: v + 0.05 for k, v in g1.items()}
    resumed, _ = outer.step(tensors, agg, restored, config)
    uninterrupted, _ = outer.step(g1, agg, state, config)
    assert all(np.array_equal(resumed[k], uninterrupted[k]) for k in g1)


def campaign_file(tmp_path: Path, table: str) -> Path:
    (tmp_path / "test.jsonl").write_text("{}\n")
    path = tmp_path / "c.toml"
    path.write_text(f'name = "x"\nbase_model = "tiny"\neval_file = "test.jsonl"\n[outer]\n{table}\n')
    return path


def test_an_unset_lr_is_the_optimizer_s_own_default(tmp_path: Path) -> None:
    assert load(campaign_file(tmp_path, 'optimizer = "adam"')).outer.lr == outer.DEFAULT_LR["adam"]
    assert load(campaign_file(tmp_path, 'optimizer = "nesterov"\nlr = 0.5')).outer.lr == 0.5


@pytest.mark.parametrize(
    ("table", "said"),
    [
        ('optimizer = "sgd"', "outer.optimizer = 'sgd' is unknown: use one of none, nesterov, adam"),
        ("lr = 0", "outer.lr = 0 in the campaign file must be above 0 and at most 10"),
        ("momentum = 1.0", "outer.momentum = 1.0 in the campaign file must be at least 0 and below 1"),
        ('lr = "0.7"', 'outer.lr = "0.7" in the campaign file must be a number'),
        ("rate = 0.7", "unknown key outer.rate in the campaign file"),
    ],
)
def test_outer_keys_are_type_and_range_checked_in_one_line(tmp_path: Path, table: str, said: str) -> None:
    with pytest.raises(CommonsError) as err:
        load(campaign_file(tmp_path, table))
    assert str(err.value).startswith(said) and "\n" not in str(err.value)


def test_a_resumed_campaign_goes_on_with_the_saved_outer_state(tmp_path: Path,
                                                               one_torch_thread: None) -> None:
    from test_runner import Crash, LocalGrid, final_tensors, setup  # the runner tests' in-process grid

    fields = {"rounds": 2, "shards": "none", "aggregation": "fedavg",
              "outer": {"optimizer": "nesterov", "lr": 0.7, "momentum": 0.9},
              "train": {"steps": 2, "batch_size": 2, "max_length": 48, "lr": 0.05}}
    campaign, data, home = setup(tmp_path / "straight", 2, **fields)
    runner.run(LocalGrid(tmp_path / "straight", data, ["honest"] * 2), campaign, home)
    straight = outer.split(final_tensors(home))[0]

    campaign, data, home = setup(tmp_path / "killed", 2, **fields)
    with pytest.raises(Crash):
        runner.run(LocalGrid(tmp_path / "killed", data, ["honest"] * 2, crash_at=2), campaign, home)
    _, moments = outer.split(final_tensors(home))
    assert set(moments) == {f"momentum.{k}" for k in straight}  # round 1's state is in its checkpoint
    runner.run(LocalGrid(tmp_path / "killed", data, ["honest"] * 2), campaign, home)
    resumed = outer.split(final_tensors(home))[0]
    assert set(resumed) == set(straight)
    for key in straight:
        np.testing.assert_allclose(resumed[key], straight[key], rtol=0, atol=1e-6)
