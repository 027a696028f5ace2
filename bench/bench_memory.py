"""The memory plan's predicted peak (modeling/memory.py) against the measured peak of real training steps.

    python -m bench memory                              # SmolLM2-135M, fp32 and nf4, ± checkpointing
    python bench/bench_memory.py smollm2 nf4 1 8 4 256  # one run: model, quantization, checkpointing,
                                                        # batch, micro-batch, max_length

Each configuration runs in a fresh process with glibc's mmap threshold pinned at 64 KiB, so a freed
tensor goes back to the OS and RSS follows the live tensors instead of the allocator's high tide.
Batches are padded to max_length and contain padding (records of 0.5-1.6 × max_length tokens, not
grouped by length): the case the plan predicts. On CPU the plan's dtype is float32 (node/hardware.py).

Measured two ways:
- `measured_gb`: the weights (parameter and buffer storages) plus the peak of live CPU tensor bytes during
  training steps 3-4 (torch profiler memory records): the CPU counterpart of `max_memory_allocated`.
- `rss_gb`: the anonymous RSS peak over steps 1-2 above the process before loading (sampled every
  millisecond, no profiler running) plus the weights that stay file-backed (safetensors pages mapped
  in): what the OS had to hold, allocator slack included. `load_gb`: the same while loading.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

GB = 2**30

CASES = [  # (quantization, checkpointing, batch, micro, max_length)
    ("none", False, 8, 8, 128), ("none", True, 8, 8, 128),
    ("nf4", False, 8, 8, 128), ("nf4", True, 8, 8, 128),
    ("none", False, 4, 2, 256), ("nf4", True, 4, 2, 256),  # other shapes: not used to calibrate
]
WORDS = ["date", "year", "month", "day", "morning", "evening", "river", "mountain", "letter", "number",
         "answer", "question", "city"]


class Sampler(threading.Thread):
    """Peak anonymous RSS (resident minus file-backed pages) of this process, sampled every millisecond:
    model weights read lazily from a safetensors file are file-backed and stay in `weights` below."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.running = True

    def anon(self) -> int:
        resident, shared = (int(x) for x in Path("/proc/self/statm").read_text().split()[1:3])
        return (resident - shared) * self.page

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.anon())
            time.sleep(0.001)


def tensor_peak(prof: Any) -> int:
    """Peak of live CPU tensor bytes during a profile, over where it started (its memory records)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def records(n: int, max_length: int, seed: int = 0) -> list[dict]:
    """Chat records of about 0.5-1.6 × max_length tokens: a word is about one token, the user turn repeats
    a third of the answer, and the chat template adds about 30."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = max(1, int((max_length * rng.uniform(0.5, 1.6) - 30) * 3 / 4))
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append({"messages": [{"role": "user", "content": "Repeat: " + text[: len(text) // 3]},
                                 {"role": "assistant", "content": text}]})
    return out


def child(model_id: str, quantization: str, checkpointing: bool, batch: int, micro: int, max_length: int,
          steps: int = 4) -> dict:
    """One measured run in this process (call it in a fresh one): RSS sampled and time taken over steps
    1-2, tensors profiled over steps 3-4 (the profiler's own records would inflate RSS). Adam's moments
    exist from step 1 on, so steps 2 and 4 each reach the whole peak."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from modeling.load import load_base, load_tokenizer, model_config
    from modeling.lora import wrap
    from modeling.memory import ModelShape, Workload, estimate, peak_gb
    from node.train import TrainConfig, train

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tokenizer = load_tokenizer(model_id)
    data = records(batch * steps, max_length)
    sampler = Sampler()
    baseline = sampler.anon()
    sampler.start()
    base, _ = load_base(model_id, quantization=quantization)
    model = wrap(base, {"r": 8, "alpha": 16})
    load_peak, sampler.peak = sampler.peak, 0
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in [*model.parameters(), *model.buffers()]}
    weights = sum(storages.values())
    mapped = max(0, weights - (sampler.anon() - baseline))  # weights still in the file's pages (mmap)
    times: list[float] = []
    last = [time.perf_counter()]
    rss = [0]
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def on_step(step: int, loss: float, tps: float) -> None:
        times.append(time.perf_counter() - last[0])
        if step == 2:
            rss[0] = sampler.peak
            sampler.running = False
            prof.start()
        if step == 4:
            prof.stop()
        last[0] = time.perf_counter()

    config = TrainConfig(steps=steps, batch_size=batch, max_length=max_length, micro_batch=micro,
                         gradient_checkpointing=checkpointing, group_by_length=False)
    result = train(model, tokenizer, data, config, on_step=on_step)
    shape = ModelShape.from_config(model_config(model_id))
    parts = estimate(shape, Workload(batch, max_length, 8), quantization, "float32", checkpointing, micro)
    predicted = peak_gb(parts)
    measured = (weights + tensor_peak(prof)) / GB
    return {
        "model": model_id, "quantization": quantization, "gradient_checkpointing": checkpointing,
        "batch": batch, "micro_batch": micro, "max_length": max_length,
        "predicted_gb": round(predicted, 3), "measured_gb": round(measured, 3),
        "error": round(measured / predicted - 1, 3),
        "rss_gb": round((rss[0] - baseline + mapped) / GB, 3),
        "load_gb": round((load_peak - baseline) / GB, 3), "weights_gb": round(weights / GB, 3),
        "parts_gb": {k: round(v / GB, 3) for k, v in parts.items()},
        "step_seconds": round(times[1], 2), "padding": round(result.padding, 3),
    }


def measure(model_id: str, case: tuple) -> dict:
    quantization, checkpointing, batch, micro, max_length = case
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, __file__, model_id, quantization, str(int(checkpointing)), str(batch), str(micro),
            str(max_length)]
    out = subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=1800,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]
        raise RuntimeError(last[0])
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_time_ratio(model_id: str = "smollm2", batch: int = 4, max_length: int = 128, pairs: int = 3) -> dict:
    """nf4 ÷ fp32 seconds per training step, both models in this process, steps alternated ABBA after a
    warm-up of each (a shared machine's load then hits both alike); the median of the pairs' ratios."""
    import statistics

    from modeling.load import load_base, load_tokenizer
    from modeling.lora import wrap
    from node.train import TrainConfig, train

    tokenizer = load_tokenizer(model_id)
    models = {q: wrap(load_base(model_id, quantization=q)[0], {"r": 8, "alpha": 16}) for q in ("none", "nf4")}
    data = records(batch, max_length)
    config = TrainConfig(steps=1, batch_size=batch, max_length=max_length, group_by_length=False)
    seconds: dict[str, list[float]] = {"none": [], "nf4": []}
    for rep in range(pairs + 1):
        for q in ("none", "nf4") if rep % 2 == 0 else ("nf4", "none"):
            result = train(models[q], tokenizer, data, config)
            if rep:  # the first of each is a warm-up
                seconds[q].append(result.seconds)
    ratios = [b / a for a, b in zip(seconds["none"], seconds["nf4"])]
    return {"nf4_over_fp32": round(statistics.median(ratios), 2), "fp32_s": seconds["none"],
            "nf4_s": seconds["nf4"], "batch": batch, "max_length": max_length}


def run(model_id: str = "smollm2") -> dict:
    rows = [measure(model_id, case) for case in CASES]
    worst = max(abs(r["error"]) for r in rows)
    timing = step_time_ratio(model_id)
    return {
        "name": "bench_memory", "ratio": round(worst, 3), "goal": "≤ 0.20", "rows": rows, "step_time": timing,
        "summary": f"predicted vs measured peak within {worst:.0%} on {len(rows)} CPU runs of {model_id}; "
                   f"an nf4 step takes {timing['nf4_over_fp32']}× an fp32 one on CPU",
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["time"]:
        print(json.dumps(step_time_ratio(*sys.argv[2:3])))
    elif len(sys.argv) == 7:
        name, quant, ckpt, batch, micro, length = sys.argv[1:]
        print(json.dumps(child(name, quant, ckpt == "1", int(batch), int(micro), int(length))))
    else:
        print(json.dumps(run(*sys.argv[1:2]), indent=1))
