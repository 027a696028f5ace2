"""Peak memory of real LoRA training steps with an nf4 base vs the node's unquantized placement, same run.

    python -m bench nf4_memory                # `make bench`: SmolLM2-135M, the demo's batch 8 × 96 tokens
    python bench/bench_nf4_memory.py tiny     # another model

On a CPU the node trains in float32 (node/hardware.py), so the reference is float32; on a GPU it is
bf16, and bench_gpu.py reports that ratio for a 7B-shaped model. Both runs go through bench_memory.py's
measurement, a fresh process each: load + wrap + its training steps at the same batch, micro-batch (the
whole batch), max_length and LoRA, no gradient checkpointing. Its `measured_gb` is the weights plus the
peak of live tensor bytes during the steps (the CPU counterpart of `torch.cuda.max_memory_allocated`);
its `rss_gb` what the OS held, allocator slack included.

    ratio = measured nf4 peak ÷ measured float32 peak (below 1: nf4 saves memory)

The weights shrink far more than the step's peak: the activations are the same in both (nf4's are even
float32, as `prepare_model_for_kbit_training` leaves the stream), and on a small model they weigh more.
`weights_ratio` compares the weights alone, `rss_ratio` the RSS peaks, and the plan's predicted ratio
(modeling/memory.py) is shown beside the measured one. Keys bench_memory.py may not report are None.
"""

from __future__ import annotations

import json
import sys

from bench.bench_memory import measure as measure_peak

BATCH = 8  # the demo's campaign (commons/demo.py): batch 8, max_length 96, all of it in one micro-batch
MAX_LENGTH = 96


def measure(model_id: str = "smollm2") -> dict:
    full = measure_peak(model_id, ("none", False, BATCH, BATCH, MAX_LENGTH))
    nf4 = measure_peak(model_id, ("nf4", False, BATCH, BATCH, MAX_LENGTH))

    def ratio(key: str) -> float | None:
        return round(nf4[key] / full[key], 3) if nf4.get(key) and full.get(key) else None

    return {
        "name": "bench_nf4_memory", "ratio": ratio("measured_gb"), "model": model_id, "reference": "float32",
        "batch": BATCH, "max_length": MAX_LENGTH,
        "nf4_peak_gb": nf4["measured_gb"], "float32_peak_gb": full["measured_gb"],
        "weights_ratio": ratio("weights_gb"), "rss_ratio": ratio("rss_gb"),
        "predicted_ratio": ratio("predicted_gb"),
        "nf4": nf4, "float32": full,
        "summary": f"{model_id} training step peaks at {nf4['measured_gb']:.2f} GB in nf4 vs "
                   f"{full['measured_gb']:.2f} GB in float32 (weights alone: {nf4.get('weights_gb')} vs "
                   f"{full.get('weights_gb')} GB)",
    }


def run() -> dict:
    return measure()


if __name__ == "__main__":
    print(json.dumps(measure(*sys.argv[1:2]), indent=1))
