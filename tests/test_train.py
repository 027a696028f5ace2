"""The training loop and evaluation on a tiny random-init model (milliseconds per step)."""

from __future__ import annotations

import numpy as np
import pytest

from commons.demo_task import STYLES, make_records
from coordinator.evaluate import exact_match, generate, greedy_hits, normalize
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


def test_teacher_forced_hits_are_what_greedy_decoding_writes() -> None:
    """exact_match decodes only the records one forward pass cannot vouch for; on a model that learned some
    answers and not others, its score is full greedy decoding's, record for record."""
    import types

    import torch

    torch.manual_seed(0)
    model, tokenizer = load_base("tiny")  # its own copy: this test trains every weight
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    records = make_records(6, ["numeric", "spelled"], seed=7)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = [encode(tokenizer, r["messages"], max_length=128) for r in records[:4]]  # 4 learned, 2 unseen
    for _ in range(80):
        for ids, labels in batch:
            model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    golds = [normalize(r["messages"][-1]["content"]) for r in records]
    decoded = [normalize(a) == g for a, g in zip(generate(model, tokenizer, records), golds)]
    sure = greedy_hits(model, tokenizer, records)
    assert any(sure) and not all(decoded)
    assert all(d for d, s in zip(decoded, sure) if s)  # a teacher-forced hit is a decoded hit

    class NoCache(torch.nn.Module):  # a model that neither returns nor takes a `cache`: rows run whole
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, **kw):
            if "cache" in kw:
                raise TypeError("unexpected keyword argument 'cache'")
            return types.SimpleNamespace(logits=self.inner(**kw).logits)

    assert greedy_hits(NoCache(), tokenizer, records) == sure
    assert exact_match(model, tokenizer, records)["accuracy"] == sum(decoded) / len(records)


def test_exact_match_scores_answers_strictly(tiny) -> None:
    base, tokenizer = tiny
    records = make_records(4, ["spelled"], seed=4)
    result = exact_match(base, tokenizer, records)
    assert result["n"] == 4 and result["accuracy"] == 0.0  # a random model does not write ISO dates
    assert normalize(" 2021-03-04.\n") == "2021-03-04" and normalize("on 2021-03-04") != "2021-03-04"
