"""Exact-match evaluation of a chat model on held-out `messages` records (greedy decoding).

Greedy decoding is token-by-token: 12 forward passes per batch. Most records of a trained adapter are
hits, and a hit is decided by one forward pass: if the argmax at every answer position, given the gold
prefix, is the gold token, and after it the end-of-turn token, greedy decoding emits exactly the gold
answer and stops (by induction over the positions). So `exact_match` checks every record teacher-forced
first and decodes only the others; the score is the one full decoding gives (up to float rounding between
padded layouts in a near-tie), at a fraction of the time once the adapter is good.
"""

from __future__ import annotations

from typing import Any

import torch

from modeling.quantization import TrainedAs

MAX_NEW_TOKENS = 12


def normalize(text: str) -> str:
    """Whitespace and a trailing full stop are not the model's answer; everything else counts."""
    return text.strip().rstrip(".").strip()


def _prompt(tokenizer: Any, record: dict) -> str:
    return tokenizer.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)


def generate(model: Any, tokenizer: Any, records: list[dict], batch_size: int = 32,
             max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    prompts = [_prompt(tokenizer, r) for r in records]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            inputs = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
            new = out[:, inputs["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def greedy_hits(model: Any, tokenizer: Any, records: list[dict], batch_size: int = 32,
                max_new_tokens: int = MAX_NEW_TOKENS) -> list[bool]:
    """Per record: would greedy decoding emit exactly the gold answer and then end the turn? One forward
    pass per batch (teacher-forced). False means "decode it to know", not "wrong"."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return [False] * len(records)
    rows = []
    for r in records:
        prompt = tokenizer(_prompt(tokenizer, r), add_special_tokens=False)["input_ids"]
        answer = tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"] + [eos]
        rows.append((prompt, answer))
    hits: list[bool] = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        said = _predicted(model, batch, tokenizer.pad_token_id or 0)
        hits += [len(a) <= max_new_tokens and got == a for (_, a), got in zip(batch, said, strict=True)]
    return hits


def _predicted(model: Any, batch: list[tuple[list[int], list[int]]], pad: int) -> list[list[int]]:
    """For each (prompt, answer): the argmax token at each answer position given the gold prefix.

    The prompts share their chat template's opening (system prompt, instruction): it runs once, its
    key/value cache is repeated over the batch, and only each row's remainder runs (right-padded, so the
    padding comes after every real token and changes nothing before it). A model whose cache cannot be
    shared this way runs every row whole."""
    device = next(model.parameters()).device
    shared = _common_prefix([p + a for p, a in batch], min(len(p) for p, _ in batch) - 1)
    cache = None
    if shared:
        try:
            with torch.no_grad():
                cache = model(input_ids=torch.tensor([batch[0][0][:shared]], device=device),
                              use_cache=True).cache
            cache.batch_repeat_interleave(len(batch))
        except (AttributeError, TypeError, NotImplementedError):
            cache, shared = None, 0
    tails = [(p + a)[shared:] for p, a in batch]
    width = max(len(t) for t in tails)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for j, tail in enumerate(tails):
        ids[j, : len(tail)] = torch.tensor(tail)
        mask[j, shared : shared + len(tail)] = 1
    positions = torch.arange(shared, shared + width).expand(len(batch), -1)
    reuse = {"cache": cache, "use_cache": True} if cache is not None else {}  # whole rows: no cache at all
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), **reuse).logits
    predicted = logits.argmax(-1).cpu()
    # position t predicts token t + 1: the answer's tokens come from the last prompt position on
    return [predicted[j, len(p) - shared - 1 : len(p) - shared - 1 + len(a)].tolist()
            for j, (p, a) in enumerate(batch)]


def _common_prefix(rows: list[list[int]], cap: int) -> int:
    """How many leading tokens every row shares (at most `cap`)."""
    n = 0
    while n < cap and all(row[n] == rows[0][n] for row in rows):
        n += 1
    return n


def exact_match(model: Any, tokenizer: Any, records: list[dict], batch_size: int = 32) -> dict:
    golds = [r["messages"][-1]["content"] for r in records]
    sure = greedy_hits(model, tokenizer, records, batch_size=batch_size)
    unsure = [i for i, hit in enumerate(sure) if not hit]
    decoded = dict(zip(unsure, generate(model, tokenizer, [records[i] for i in unsure],
                                        batch_size=batch_size), strict=True))
    answers = [decoded.get(i, g) for i, g in enumerate(golds)]
    hits = [normalize(a) == normalize(g) for a, g in zip(answers, golds)]
    samples = [
        {"prompt": r["messages"][-2]["content"], "expected": g, "answer": a.strip()}
        for r, g, a in list(zip(records, golds, answers))[:5]
    ]
    return {"accuracy": sum(hits) / max(len(hits), 1), "n": len(hits), "samples": samples,
            "base_precision": TrainedAs.of(model).label()}
