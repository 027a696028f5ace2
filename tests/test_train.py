"""The training loop and evaluation on a tiny random-init model (milliseconds per step)."""

from __future__ import annotations

import numpy as np
import pytest

from commons.demo_task import STYLES, make_records
from coordinator.evaluate import exact_match, normalize
from modeling.load import load_base
from modeling.lora import get_state, set_state, wrap
from node.train import TrainConfig, encode, train


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


def test_only_the_answer_is_learned(tiny) -> None:
    _, tokenizer = tiny
    record = make_records(1, ["numeric"], seed=1)[0]
    ids, labels = encode(tokenizer, record["messages"], max_length=128)
    learned = tokenizer.decode([t for t, y in zip(ids, labels) if y != -100])
    assert learned.startswith(record["messages"][-1]["content"]) and "YYYY" not in learned
    assert len(ids) == len(labels)


def test_training_lowers_the_loss_and_returns_every_lora_tensor(tiny) -> None:
    base, tokenizer = tiny
    model = wrap(base, {"r": 4, "alpha": 8})
    records = make_records(8, list(STYLES), seed=2)
    result = train(model, tokenizer, records, TrainConfig(steps=12, batch_size=8, lr=5e-2))
    assert np.mean(result.losses[-3:]) < result.losses[0] - 0.1  # a random model learns slowly, but it learns
    assert result.num_examples == 96 and result.tokens > 0
    assert set(result.state) == set(get_state(model)) and all("lora_" in k for k in result.state)


def test_a_shard_trains_only_its_own_keys(tiny) -> None:
    base, tokenizer = tiny
    model = wrap(base, {"r": 4, "alpha": 8})
    before = get_state(model)
    shard = sorted(k for k in before if ".layers.0." in k)
    result = train(model, tokenizer, make_records(4, ["numeric"], seed=3),
                   TrainConfig(steps=3, batch_size=4, lr=1e-2), keys=shard)
    after = get_state(model)
    assert set(result.state) == set(shard)
    assert any(not np.array_equal(before[k], after[k]) for k in shard)
    assert all(np.array_equal(before[k], after[k]) for k in before if k not in shard)


def test_set_state_refuses_keys_the_model_lacks(tiny) -> None:
    base, _ = tiny
    model = wrap(base, {"r": 4, "alpha": 8})
    with pytest.raises(ValueError, match="keys this model lacks"):
        set_state(model, {"base_model.model.nope.lora_A.weight": np.zeros((4, 4), np.float32)})


def test_exact_match_scores_answers_strictly(tiny) -> None:
    base, tokenizer = tiny
    records = make_records(4, ["spelled"], seed=4)
    result = exact_match(base, tokenizer, records)
    assert result["n"] == 4 and result["accuracy"] == 0.0  # a random model does not write ISO dates
    assert normalize(" 2021-03-04.\n") == "2021-03-04" and normalize("on 2021-03-04") != "2021-03-04"
