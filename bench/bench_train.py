"""Node training throughput: our `node.train.train` vs a plain PEFT loop, same model, batches and steps.

    python bench/bench_train.py             # the tiny model (49k-token head: real matmuls), 30 steps × batch 2
    python bench/bench_train.py smollm2 6   # SmolLM2-135M, 6 steps (minutes on a loaded 2-core machine)

ratio = our tokens/s ÷ the plain loop's tokens/s (goal ≥ 0.97). The plain loop is what a PEFT tutorial
writes: AdamW over the LoRA parameters, pad the batch, forward, backward, step, zero_grad, on the same
examples in the same order.
Ours adds what a volunteer needs (finite-loss check, gradient clipping, the status callback). The two
alternate (ours, plain, × 3, after a warm-up of each) on the same wrapped model and the best of each is kept, so load from
other processes on a shared machine hits both alike.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from commons.demo_task import STYLES, make_records
from node.train import TrainConfig, collate, encode, train
from protocol.lora import wrap
from protocol.models import load_base


def plain_peft_loop(model, batches: list[list[tuple[list[int], list[int]]]], pad_id: int, lr: float) -> float:
    """Tokens per second of the textbook loop (batches padded as they are drawn, as a DataLoader would)."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start, tokens = time.perf_counter(), 0
    for batch in batches:
        inputs = collate(batch, pad_id)
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(inputs["attention_mask"].sum())
    seconds = time.perf_counter() - start
    model.eval()
    return tokens / seconds


def run(model_id: str = "tiny", steps: int = 30, batch_size: int = 2, max_length: int = 64, reps: int = 3) -> dict:
    base, tokenizer = load_base(model_id)
    model = wrap(base, {"r": 8, "alpha": 16})
    records = make_records(steps * batch_size, list(STYLES), seed=3)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=2e-3, max_length=max_length, seed=0)
    # the exact batches train() will draw (its shuffle is seeded), so both loops see the same tokens
    examples = [encode(tokenizer, r["messages"], max_length) for r in records]
    import random

    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    batches = [[examples[i] for i in order[s * batch_size : (s + 1) * batch_size]] for s in range(steps)]
    train(model, tokenizer, records, TrainConfig(steps=3, batch_size=batch_size, max_length=max_length))  # warm-up
    plain_peft_loop(model, batches[:3], tokenizer.pad_token_id, config.lr)
    ours, plain = [], []
    for _ in range(reps):
        result = train(model, tokenizer, records, config)
        ours.append(result.tokens / result.seconds)
        plain.append(plain_peft_loop(model, batches, tokenizer.pad_token_id, config.lr))
    tokens = sum(len(ids) for batch in batches for ids, _ in batch)
    ratio = max(ours) / max(plain)
    return {
        "name": "bench_train",
        "ratio": round(ratio, 3),
        "goal": 0.97,
        "model": model_id,
        "steps": steps,
        "batch_size": batch_size,
        "tokens_per_run": tokens,
        "ours_tokens_per_s": [round(x, 1) for x in ours],
        "plain_tokens_per_s": [round(x, 1) for x in plain],
        "threads": torch.get_num_threads(),
        "summary": f"node train {max(ours):.0f} tok/s vs plain PEFT loop {max(plain):.0f} tok/s ({model_id})",
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(run(*(args[:1] or ["tiny"]), *[int(a) for a in args[1:2]]), indent=1))
