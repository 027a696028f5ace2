"""Upload bytes per node per round (hardware-sized shard + bf16/int8) vs the fp32 full adapter, and what
the compression and the aggregation rule do to the held-out eval of the demo task (dates → ISO 8601).

    python bench/bench_upload.py            # SmolLM2-135M, 3 volunteers × 2 steps, 16 held-out records
    python bench/bench_upload.py tiny       # the tiny random model (bytes only mean something here)

Bytes: the shard plan for 8 equal volunteers (min_coverage 2: every layer trained by 2 nodes; the
campaign default 3 is reported too) on the
model's LoRA keys; each node uploads its shard encoded as the campaign asks (`protocol.update.encode`).
ratio = mean upload bytes per node (shard + int8) ÷ the fp32 full adapter (goal ≤ 1/8).
Eval: 3 non-IID volunteers train from the same global adapter; their updates are aggregated (robust)
after an fp32, bf16 or int8 round trip, and the merged model is scored on held-out records with the
answer tokens teacher-forced: loss and token accuracy (goal: within 1 % of fp32). The same updates
also give fedavg vs exact (FedEx-LoRA, residual folded into the base) and the published rank-r
re-projection of exact.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from commons.demo_task import STYLES, make_records
from coordinator.plan import layers_from_keys, make_plan, shard_keys
from coordinator.rules import Update, aggregate
from coordinator.rules.exact import apply, project, snapshot
from modeling.load import load_base
from modeling.lora import get_state, set_state, wrap
from node.train import TrainConfig, collate, encode, train
from protocol.update import decode, wire_bytes
from protocol.update import encode as encode_update

CPU = {"device": "cpu", "vram_gb": None, "cpu_cores": 4, "ram_gb": 16.0}


def held_out(model, tokenizer, records: list[dict], max_length: int = 64) -> dict:
    """Teacher-forced answer loss and answer-token accuracy."""
    examples = [encode(tokenizer, r["messages"], max_length) for r in records]
    total_loss, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            inputs = collate(examples[i : i + 8], tokenizer.pad_token_id)
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            labels = inputs["labels"][:, 1:]
            mask = labels != -100
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total_loss -= float(picked[mask].sum())
            hits += int((logits[:, :-1].argmax(-1) == labels)[mask].sum())
            count += int(mask.sum())
    return {"loss": round(total_loss / count, 5), "token_accuracy": round(hits / count, 5)}


def upload_bytes(g: dict[str, np.ndarray], update: dict[str, np.ndarray], nodes: int = 8,
                 coverage: int = 2) -> dict:
    plan = make_plan(layers_from_keys(g), {f"n{i}": CPU for i in range(nodes)}, min_coverage=coverage)
    full = wire_bytes(encode_update(g, g, "fp32"))
    out = {"fp32_full_adapter": full}
    for dtype in ("fp32", "bf16", "int8"):
        sizes = [wire_bytes(encode_update({k: update[k] for k in shard_keys(plan, s.node_id, g)}, g, dtype))
                 for s in plan.shards]
        out[f"shard_{dtype}_mean"] = int(np.mean(sizes))
        out[f"shard_{dtype}_max"] = int(max(sizes))
    return out


def run(model_id: str = "smollm2", nodes: int = 3, steps: int = 2, batch_size: int = 2) -> dict:
    start = time.perf_counter()
    base, tokenizer = load_base(model_id)
    model = wrap(base, {"r": 8, "alpha": 16})
    g = get_state(model)
    test = make_records(16, list(STYLES), seed=1000)
    updates = []
    for i in range(nodes):
        set_state(model, g)
        records = make_records(steps * batch_size, [list(STYLES)[i % len(STYLES)]], seed=1 + i)
        result = train(model, tokenizer, records, TrainConfig(steps=steps, batch_size=batch_size, lr=2e-3,
                                                               max_length=64, seed=i))
        updates.append(result.state)
    sizes = upload_bytes(g, updates[0])
    cov3 = upload_bytes(g, updates[0], coverage=3)

    def score(tensors: dict[str, np.ndarray]) -> dict:
        set_state(model, tensors)
        return held_out(model, tokenizer, test)

    evals = {}
    for dtype in ("fp32", "bf16", "int8"):
        decoded = [decode(encode_update(u, g, dtype), g, dtype) for u in updates]
        merged, _ = aggregate(g, [Update(f"n{i}", t, 10) for i, t in enumerate(decoded)], "robust")
        evals[dtype] = score(merged)
    naive, _ = aggregate(g, [Update(f"n{i}", t, 10) for i, t in enumerate(updates)], "fedavg")
    exact, report = aggregate(g, [Update(f"n{i}", t, 10) for i, t in enumerate(updates)], "exact")
    rules = {"base": score(g), "fedavg": score(naive)}
    scaling = 16 / 8
    originals = snapshot(model, report.residuals)
    set_state(model, exact)
    apply(model, originals, report.residuals, scaling)
    rules["exact"] = held_out(model, tokenizer, test)
    apply(model, originals, {}, scaling)
    rules["exact_published_rank_r"] = score(project(exact, report.residuals))
    ratio = sizes["shard_int8_mean"] / sizes["fp32_full_adapter"]
    worst = max(abs(evals[d]["loss"] - evals["fp32"]["loss"]) / evals["fp32"]["loss"]
                for d in ("bf16", "int8"))
    return {
        "name": "bench_upload",
        "ratio": round(ratio, 4),
        "goal": "<= 0.125, eval within 1%",
        "bf16_ratio": round(sizes["shard_bf16_mean"] / sizes["fp32_full_adapter"], 4),
        # the campaign default, min_coverage = 3 (3 trainers per layer out-vote one bad volunteer)
        "coverage3_int8_ratio": round(cov3["shard_int8_mean"] / cov3["fp32_full_adapter"], 4),
        "coverage3_bf16_ratio": round(cov3["shard_bf16_mean"] / cov3["fp32_full_adapter"], 4),
        "bytes": sizes,
        "eval": evals,
        "eval_max_rel_loss_delta": round(worst, 5),
        "rules": rules,
        "model": model_id,
        "summary": (
            f"int8 shard {ratio:.3f}× / bf16 shard "
            f"{sizes['shard_bf16_mean'] / sizes['fp32_full_adapter']:.3f}× of fp32 full; eval loss within "
            f"{worst:.2%}; fedavg loss {rules['fedavg']['loss']:.4f} vs exact {rules['exact']['loss']:.4f} "
            f"({time.perf_counter() - start:.0f}s)"
        ),
    }


if __name__ == "__main__":
    print(json.dumps(run(*sys.argv[1:2]), indent=1))
