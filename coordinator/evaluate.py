"""Exact-match evaluation of a chat model on held-out `messages` records (greedy decoding)."""

from __future__ import annotations

from typing import Any

import torch

from modeling.quantization import TrainedAs


def normalize(text: str) -> str:
    """Whitespace and a trailing full stop are not the model's answer; everything else counts."""
    return text.strip().rstrip(".").strip()


def generate(model: Any, tokenizer: Any, records: list[dict], batch_size: int = 32,
             max_new_tokens: int = 12) -> list[str]:
    prompts = [
        tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
        for r in records
    ]
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


def exact_match(model: Any, tokenizer: Any, records: list[dict], batch_size: int = 32) -> dict:
    golds = [r["messages"][-1]["content"] for r in records]
    answers = generate(model, tokenizer, records, batch_size=batch_size)
    hits = [normalize(a) == normalize(g) for a, g in zip(answers, golds)]
    samples = [
        {"prompt": r["messages"][-2]["content"], "expected": g, "answer": a.strip()}
        for r, g, a in list(zip(records, golds, answers))[:5]
    ]
    return {"accuracy": sum(hits) / max(len(hits), 1), "n": len(hits), "samples": samples,
            "base_precision": TrainedAs.of(model).label()}  # the precision the scores were measured in
