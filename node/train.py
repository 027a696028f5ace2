"""Local LoRA training, top to bottom: load, wrap with LoRA, loop, return the (shard of the) adapter."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from node import resume
from node.resume import Checkpoint
from protocol.lora import get_state


@dataclass
class TrainConfig:
    steps: int = 20
    batch_size: int = 8
    lr: float = 2e-3
    max_length: int = 128
    seed: int = 0


@dataclass
class TrainResult:
    state: dict[str, np.ndarray]
    num_examples: int
    tokens: int
    loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0  # the step a checkpoint let this round start at


def encode(tokenizer: Any, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; only the final assistant turn is learned (prompt tokens are masked)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
    labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
    return full_ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def trainable(model: Any, keys: list[str] | None) -> list[torch.nn.Parameter]:
    """Unfreeze only the LoRA parameters of this node's shard (all LoRA parameters when keys is None)."""
    wanted = None if keys is None else {k.removesuffix(".weight") for k in keys}
    params = []
    for name, param in model.named_parameters():
        is_lora = "lora_" in name
        stem = name.replace(".default", "").removesuffix(".weight")
        on = is_lora and (wanted is None or stem in wanted)
        param.requires_grad_(on)
        if on:
            params.append(param)
    return params


def train(
    model: Any,
    tokenizer: Any,
    records: list[dict],
    config: TrainConfig,
    keys: list[str] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    checkpoint: Checkpoint | None = None,
) -> TrainResult:
    """Run `config.steps` AdamW steps over shuffled records; returns the shard's new LoRA weights.

    With a `checkpoint` the loop saves itself when it is due and, when the checkpoint was loaded, starts
    from its step: the result (weights, losses, tokens, examples) equals the uninterrupted run's."""
    params = trainable(model, keys)
    if not params:
        raise ValueError("this shard selects no LoRA parameters of the model")
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    examples = [encode(tokenizer, r["messages"], config.max_length) for r in records]
    rng = random.Random(config.seed)
    order: list[int] = []
    device = params[0].device  # a GPU volunteer's model lives on the GPU: its batches must too
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    model.train()
    first, tokens, seen, losses, before = 0, 0, 0, [], 0.0
    if checkpoint is not None and checkpoint.state is not None:
        order, counters = resume.restore(checkpoint.state, named, optimizer, rng)
        first, tokens, seen = checkpoint.step, int(counters["tokens"]), int(counters["seen"])
        losses, before = [float(x) for x in counters["losses"]], float(counters["seconds"])
    start, tokens_here = time.perf_counter(), 0
    for step in range(first, config.steps):
        if len(order) < config.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        batch = [examples[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        inputs = {k: v.to(device) for k, v in collate(batch, tokenizer.pad_token_id).items()}
        loss = model(**inputs).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training diverged at step {step} (loss {loss.item()}); lower the lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batch_tokens = int(inputs["attention_mask"].sum())
        tokens, tokens_here, seen = tokens + batch_tokens, tokens_here + batch_tokens, seen + len(batch)
        losses.append(loss.item())
        if checkpoint is not None and checkpoint.due(step + 1, config.steps):
            counters = {"tokens": tokens, "seen": seen, "losses": losses,
                        "seconds": before + time.perf_counter() - start}
            checkpoint.save(resume.capture(step + 1, named, optimizer, rng, order, counters))
        if on_step:
            on_step(step + 1, losses[-1], tokens_here / max(time.perf_counter() - start, 1e-9))
    model.eval()
    state = get_state(model, keys)
    return TrainResult(
        state=state, num_examples=seen, tokens=tokens, loss=float(np.mean(losses)),
        seconds=before + time.perf_counter() - start, losses=losses, resumed_from=first,
    )
