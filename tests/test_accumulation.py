"""Micro-batches with gradient accumulation, gradient checkpointing and length grouping (node/train.py),
on the tiny random-init model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from commons.demo_task import STYLES, make_records
from modeling.load import load_base
from modeling.lora import get_state, set_state, wrap
from node.train import (
    TrainConfig,
    TrainResult,
    backward,
    encode,
    epoch_order,
    label_tokens,
    micro_batches,
    train,
    trainable,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    """(wrapped model, tokenizer, its initial LoRA state): every run starts from the same weights."""
    base, tokenizer = load_base("tiny")
    model = wrap(base, {"r": 4, "alpha": 8})
    return model, tokenizer, get_state(model)


def mixed_records(n: int, seed: int = 0) -> list[dict]:
    """Answers from 1 to 40 words: batches drawn at random pad a lot."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": "Say it."},
                          {"role": "assistant", "content": " ".join(["word"] * rng.randint(1, 40))}]}
            for _ in range(n)]


def run(tiny, records: list[dict], **config) -> tuple[dict, TrainResult]:
    model, tokenizer, start = tiny
    set_state(model, start)
    result = train(model, tokenizer, records, TrainConfig(steps=4, batch_size=8, lr=5e-2, **config))
    return result.state, result


def test_accumulated_micro_batches_give_the_whole_batchs_gradient_up_to_float_rounding(tiny) -> None:
    model, tokenizer, start = tiny
    set_state(model, start)
    set_state(model, {k: v + 0.01 for k, v in start.items()})  # B = 0 at init would zero A's gradient
    params = trainable(model, None)
    batch = [encode(tokenizer, r["messages"], 128) for r in mixed_records(8)]
    grads, losses = {}, {}
    for micro in (8, 4, 2, 1):
        model.zero_grad(set_to_none=True)
        losses[micro] = backward(model, batch, micro, tokenizer.pad_token_id, "cpu")[0]
        grads[micro] = torch.cat([p.grad.flatten() for p in params])
    scale = float(grads[8].abs().max())
    for micro in (4, 2, 1):
        assert float((grads[micro] - grads[8]).abs().max()) < 1e-5 * scale
        assert abs(losses[micro] - losses[8]) < 1e-5 * losses[8]


def test_accumulating_micro_batches_trains_the_same_weights_as_the_whole_batch(tiny) -> None:
    records = mixed_records(24)
    whole, first = run(tiny, records)
    split, result = run(tiny, records, micro_batch=2)
    # Adam divides by each gradient's own scale, so rounding shows in the weights at ~1e-3 × lr
    assert max(float(np.max(np.abs(whole[k] - split[k]))) for k in whole) < 5e-4
    np.testing.assert_allclose(result.losses, first.losses, rtol=1e-5)
    assert (result.tokens, result.num_examples) == (first.tokens, first.num_examples)


def test_gradient_checkpointing_trains_the_same_weights(tiny) -> None:
    records = make_records(16, list(STYLES), seed=5)
    plain, _ = run(tiny, records)
    saved, _ = run(tiny, records, gradient_checkpointing=True, micro_batch=4)
    assert max(float(np.max(np.abs(plain[k] - saved[k]))) for k in plain) < 1e-4
    again, _ = run(tiny, records)  # switched off again for the next round on the warm model
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny[0].modules())
    assert max(float(np.max(np.abs(plain[k] - again[k]))) for k in plain) < 1e-6


def test_grouping_by_length_leaves_less_padding_and_reports_it(tiny) -> None:
    records = mixed_records(64, seed=1)
    _, grouped = run(tiny, records, group_by_length=True)
    _, shuffled = run(tiny, records)  # the default: steps drawn at random
    assert 0 <= grouped.padding < shuffled.padding / 3
    assert grouped.tokens > 0 and shuffled.padding > 0.2


def test_a_grouped_epoch_still_visits_every_example_once_in_a_seeded_order() -> None:
    lengths = [random.Random(i).randint(5, 90) for i in range(50)]
    order = epoch_order(random.Random(3), lengths, 8, group=True)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(random.Random(3), lengths, 8, group=True)
    assert order != epoch_order(random.Random(4), lengths, 8, group=True)


def test_micro_batches_are_sorted_by_length_and_the_loss_counts_only_answer_tokens() -> None:
    batch = [([1] * n, [-100] * (n - 2) + [5, 6]) for n in (3, 9, 5, 7)]
    parts = micro_batches(batch, 2)
    assert [[len(ids) for ids, _ in p] for p in parts] == [[9, 7], [5, 3]]
    assert label_tokens(batch) == 8


def test_a_micro_batch_that_does_not_divide_the_batch_is_refused(tiny) -> None:
    model, tokenizer, _ = tiny
    with pytest.raises(ValueError, match="micro_batch 3 does not divide batch_size 8"):
        train(model, tokenizer, mixed_records(8), TrainConfig(steps=1, batch_size=8, micro_batch=3))
