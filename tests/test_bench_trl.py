"""bench/bench_trl.py: both arms train the same tokens, and the figures follow from the runs they report.

TRL is a `make bench` dependency (pyproject's `bench` extra), not a test one: without it those skip."""

from __future__ import annotations

import importlib.util

import pytest

from bench import bench_trl
from node.train import TrainConfig

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                               reason="trl comes with the bench extra (`make bench` installs it)")


def test_a_record_becomes_a_prompt_completion_pair_whose_completion_is_the_final_turn() -> None:
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "a"}], "license": "CC0-1.0"}
    pair = bench_trl.prompt_completion(record)
    assert pair == {"prompt": record["messages"][:2], "completion": [record["messages"][2]]}


def test_grouped_by_length_alike_examples_share_a_batch_and_pad_nothing() -> None:
    config = TrainConfig(steps=2, batch_size=2)
    assert bench_trl.grouped_padding([1, 10, 1, 10], config) == 0.0  # one window: [10, 10], [1, 1]


@needs_trl
def test_the_ratio_is_the_median_of_paired_ratios_and_padding_is_reported_per_arm() -> None:
    ours = [bench_trl.Run(100, 1.0, 0.01), bench_trl.Run(100, 2.0, 0.01), bench_trl.Run(100, 1.0, 0.01)]
    trl = [bench_trl.Run(100, 2.0, 0.05), bench_trl.Run(100, 1.0, 0.05), bench_trl.Run(100, 1.0, 0.05)]
    result = bench_trl.figures("tiny", TrainConfig(steps=3, batch_size=2), ours, trl)
    assert result["ratio"] == 1.0  # pairs 2.0, 0.5, 1.0
    assert result["best_of_ratio"] == 1.0
    assert (result["ours_padding"], result["trl_padding"]) == (0.01, 0.05)


@needs_trl
@pytest.mark.slow
def test_both_arms_train_the_same_real_tokens_of_the_tiny_model() -> None:
    result = bench_trl.measure("tiny", steps=2, batch_size=4, max_length=96, reps=2)
    assert result["ours_tokens"] == result["trl_tokens"] > 0  # one epoch of the same records, same template
    assert len(result["ours_tokens_per_s"]) == len(result["trl_tokens_per_s"]) == 2
    assert 0 <= result["ours_padding"] < 1 and 0 <= result["trl_padding"] < 1
    assert result["ratio"] > 0 and 0 < result["learned_fraction"] < 1  # the prompt is not learned
    assert 0 <= result["grouped_padding"] < 1
