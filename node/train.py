"""Local LoRA training, top to bottom: load, wrap with LoRA, loop, return the (shard of the) adapter.

One optimizer step takes the campaign's `batch_size` examples (the effective batch). A node short of
memory splits them into micro-batches and accumulates their gradients: each micro-batch's loss is its
summed token losses divided by the label tokens of the whole batch, so the gradient is the full batch's
up to float rounding. A step's examples are sorted by length before they are cut into micro-batches,
and with `group_by_length` whole batches are drawn by length too (a shuffled window of MEGABATCH batches
is sorted, cut into batches, and the batches are shuffled), so little compute goes to padding; the
padding that remains is reported as a fraction of the positions computed.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from modeling.lora import get_state
from node import resume
from node.resume import Checkpoint

MEGABATCH = 8  # batches sorted together: larger groups pad less but make batches less random


@dataclass
class TrainConfig:
    steps: int = 20
    batch_size: int = 8  # examples per optimizer step (the campaign's effective batch)
    lr: float = 2e-3
    max_length: int = 128
    seed: int = 0
    micro_batch: int = 0  # examples per forward/backward; 0: the whole batch. Must divide batch_size
    gradient_checkpointing: bool = False  # recompute layers in the backward pass: less memory, more compute
    # off by default: steps of alike lengths are steps of alike examples (one date style each in the demo
    # task), which slowed what honest rounds learn (tests/test_poisoning_demo.py: held-out loss 9.45 vs
    # 8.84); a step's micro-batches are sorted by length either way, which is where padding is saved
    group_by_length: bool = False

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch or self.batch_size)


@dataclass
class TrainResult:
    state: dict[str, np.ndarray]
    num_examples: int
    tokens: int
    loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0  # the step a checkpoint let this round start at
    padding: float = 0.0  # padded positions ÷ positions computed, over this run's steps
    optimizer_state: dict = field(default_factory=dict)  # AdamW's, to go on from in the next round


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


def epoch_order(rng: random.Random, lengths: list[int], batch_size: int, group: bool) -> list[int]:
    """One shuffled pass over the examples; grouped, consecutive `batch_size` runs have similar lengths."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group:
        return order
    window = batch_size * MEGABATCH
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        ranked = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]


Example = tuple[list[int], list[int]]  # token ids, labels


def micro_batches(batch: list[Example], size: int) -> list[list[Example]]:
    """The step's examples sorted by length and cut into micro-batches: each pads only to its own longest."""
    ranked = sorted(batch, key=lambda e: len(e[0]), reverse=True)
    return [ranked[i : i + size] for i in range(0, len(ranked), size)]


def label_tokens(batch: list[Example]) -> int:
    """Tokens the loss counts: labels other than -100, after the shift by one (the first never is)."""
    return sum(1 for _, labels in batch for y in labels[1:] if y != -100)


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


def set_checkpointing(model: Any, on: bool) -> None:
    """Gradient checkpointing on or off (the model is kept warm across rounds whose plans may differ).
    Non-reentrant, so the embeddings need not require grad: layers below a shard keep no graph at all."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers 4.x
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.disable_input_require_grads()
    elif any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
        disable = getattr(base, "activation_checkpointing_disable", None)
        (disable or base.gradient_checkpointing_disable)()


def backward(model: Any, batch: list[Example], micro: int, pad_id: int,
             device: Any) -> tuple[float, int, int]:
    """Accumulate the gradient of the whole batch's mean token loss, `micro` examples per forward pass:
    each micro-batch's loss is its summed token losses over the label tokens of the whole batch, so the
    sum is the full batch's gradient up to float rounding. (loss, real tokens, positions computed)."""
    counted = max(label_tokens(batch), 1)
    loss_sum, tokens, positions = 0.0, 0, 0
    for part in micro_batches(batch, micro):
        inputs = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        loss = model(**inputs, num_items_in_batch=counted).loss
        if not math.isfinite(loss.item()):
            return loss.item(), tokens, positions  # the caller stops: no backward through a NaN
        loss.backward()
        loss_sum += loss.item()
        tokens += int(inputs["attention_mask"].sum())
        positions += inputs["attention_mask"].numel()
    return loss_sum, tokens, positions


def train(
    model: Any,
    tokenizer: Any,
    records: list[dict],
    config: TrainConfig,
    keys: list[str] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    checkpoint: Checkpoint | None = None,
    optimizer_state: dict | None = None,
) -> TrainResult:
    """Run `config.steps` AdamW steps over shuffled records; returns the shard's new LoRA weights.

    With a `checkpoint` the loop saves itself when it is due and, when the checkpoint was loaded, starts
    from its step: the result (weights, losses, tokens, examples) equals the uninterrupted run's.
    `optimizer_state` (a `TrainResult.optimizer_state` of the same keys) makes AdamW go on with its
    moments and step count instead of starting over: what a volunteer keeps between rounds."""
    micro = config.micro_batch or config.batch_size
    if config.batch_size % micro:
        raise ValueError(f"micro_batch {micro} does not divide batch_size {config.batch_size}")
    params = trainable(model, keys)
    if not params:
        raise ValueError("this shard selects no LoRA parameters of the model")
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    examples = [encode(tokenizer, r["messages"], config.max_length) for r in records]
    lengths = [len(ids) for ids, _ in examples]
    rng = random.Random(config.seed)
    order: list[int] = []
    device = params[0].device  # a GPU volunteer's model lives on the GPU: its batches must too
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if optimizer_state:  # its moments and step count (a copy: AdamW would update the caller's in place)
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        optimizer.param_groups[0]["lr"] = config.lr  # its settings came along: this round's lr wins
    optimizer.zero_grad(set_to_none=True)  # a warm model may hold gradients of a round that failed mid-step
    set_checkpointing(model, config.gradient_checkpointing)
    model.train()
    first, tokens, seen, losses, before = 0, 0, 0, [], 0.0
    if checkpoint is not None and checkpoint.state is not None:
        order, counters = resume.restore(checkpoint.state, named, optimizer, rng)
        first, tokens, seen = checkpoint.step, int(counters["tokens"]), int(counters["seen"])
        losses, before = [float(x) for x in counters["losses"]], float(counters["seconds"])
    start, tokens_here, computed = time.perf_counter(), 0, 0
    for step in range(first, config.steps):
        # the next batch, in the seeded order a resumed run continues
        if len(order) < config.batch_size:
            order += epoch_order(rng, lengths, config.batch_size, config.group_by_length)
        batch = [examples[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        # forward backward, one micro-batch at a time
        loss_sum, batch_tokens, positions = backward(model, batch, micro, tokenizer.pad_token_id, device)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training diverged at step {step} (loss {loss_sum}); lower the lr")
        computed += positions
        # update
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens, tokens_here, seen = tokens + batch_tokens, tokens_here + batch_tokens, seen + len(batch)
        losses.append(loss_sum)
        # checkpoint, report
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
        padding=1 - tokens_here / max(computed, 1), optimizer_state=optimizer.state_dict(),
    )
