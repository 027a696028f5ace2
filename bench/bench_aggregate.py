"""Aggregation throughput: 100 LoRA adapters × 10 M float32 params vs a plain numpy sum of the same arrays.

    python bench/bench_aggregate.py            # prints the JSON that run() returns
    python bench/bench_aggregate.py 20 2000000 # nodes, params (smaller machines)

ratio = numpy_sum_time / our_time (1.0 = as fast as summing the arrays, higher is faster), for the
default robust rule (`ratio`) and for fedavg (`fedavg_ratio`), measured in the same process on the same
arrays. The adapters look like a 38-layer model with q/k/v/o LoRA, r=16, 2048 wide (65,536 params per
module). Each update is the global adapter plus noise, so robust selection has real work to do.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from coordinator.rules import AggregateConfig, Update, aggregate

RANK, WIDTH = 16, 2048
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
KEY = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"


def make_adapters(nodes: int, params: int, seed: int = 0) -> tuple[dict, list[Update]]:
    per_module = 2 * RANK * WIDTH
    layers = max(1, params // (per_module * len(MODULES)))
    rng = np.random.default_rng(seed)
    g = {}
    for layer in range(layers):
        for mod in MODULES:
            g[KEY.format(layer, mod, "A")] = rng.standard_normal((RANK, WIDTH), dtype=np.float32) * 0.02
            g[KEY.format(layer, mod, "B")] = rng.standard_normal((WIDTH, RANK), dtype=np.float32) * 0.002
    # one pool of noise, read at a different offset per node: distinct updates without 1e9 fresh draws
    pool = rng.standard_normal(2 * per_module * 64, dtype=np.float32) * 0.001
    updates = []
    for i in range(nodes):
        t = {}
        for j, (k, v) in enumerate(g.items()):
            off = int(rng.integers(0, pool.size - v.size))
            t[k] = v + pool[off : off + v.size].reshape(v.shape)
        updates.append(Update(f"node-{i}", t, int(rng.integers(50, 500))))
    return g, updates


def numpy_sum(updates: list[Update]) -> dict[str, np.ndarray]:
    keys = list(updates[0].tensors)
    out = {}
    for k in keys:
        acc = updates[0].tensors[k].copy()
        for u in updates[1:]:
            acc += u.tensors[k]
        out[k] = acc
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(nodes: int = 100, params: int = 10_000_000, repeats: int = 2) -> dict:
    g, updates = make_adapters(nodes, params)
    n_params = sum(v.size for v in g.values())
    t_sum = best_of(lambda: numpy_sum(updates), repeats)
    t_fedavg = best_of(lambda: aggregate(g, updates, "fedavg"), repeats)
    t_robust = best_of(lambda: aggregate(g, updates, "robust", AggregateConfig(seed=0)), repeats)
    _, report = aggregate(g, updates, "robust", AggregateConfig(seed=0))
    gb = nodes * n_params * 4 / 1e9
    return {
        "name": "aggregate_vs_numpy_sum",
        "ratio": t_sum / t_robust,
        "fedavg_ratio": t_sum / t_fedavg,
        "numpy_sum_s": t_sum,
        "fedavg_s": t_fedavg,
        "robust_s": t_robust,
        "nodes": nodes,
        "params_per_adapter": n_params,
        "input_gb": gb,
        "robust_gb_per_s": gb / t_robust,
        "robust_accepted": len(report.accepted),
        "robust_clipped": len(report.clipped),
    }


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(run(*args), indent=2))
