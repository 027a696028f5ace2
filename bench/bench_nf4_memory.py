"""Peak memory of real LoRA training steps with an nf4 base vs the node's unquantized placement, same run.

    python -m bench nf4_memory                # `make bench`: SmolLM2-135M, the demo's batch 8 × 96 tokens
    python bench/bench_nf4_memory.py tiny     # another model

On a CPU the node trains in float32 (node/hardware.py), so the reference is float32; on a GPU it is
bf16, and bench_gpu.py reports that ratio for a 7B-shaped model. Both runs go through bench_memory.py's
measurement: a fresh process each, load + wrap + 2 training steps, peak RSS above what the process held
before loading the model (Python, torch, the tokenizer), with glibc returning freed tensors to the OS.
Same batch, micro-batch (the whole batch), max_length and LoRA; no gradient checkpointing.

    ratio = measured nf4 peak ÷ measured float32 peak (below 1: nf4 saves memory)

The weights shrink far more than the step's peak: activations are the same in both (nf4's are even
float32, as `prepare_model_for_kbit_training` leaves the stream), and on a small model they dominate.
`load_ratio` compares the peaks of loading and wrapping alone; the plan's predicted ratio
(protocol/memory.py) is shown beside the measured one.
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
    ratio = nf4["measured_gb"] / full["measured_gb"]
    return {
        "name": "bench_nf4_memory", "ratio": round(ratio, 3), "model": model_id, "reference": "float32",
        "batch": BATCH, "max_length": MAX_LENGTH,
        "nf4_peak_gb": nf4["measured_gb"], "float32_peak_gb": full["measured_gb"],
        "load_ratio": round(nf4["load_gb"] / full["load_gb"], 3),
        "predicted_ratio": round(nf4["predicted_gb"] / full["predicted_gb"], 3),
        "nf4_step_seconds": nf4["step_seconds"], "float32_step_seconds": full["step_seconds"],
        "summary": f"{model_id} training step peaks at {nf4['measured_gb']:.2f} GB in nf4 vs "
                   f"{full['measured_gb']:.2f} GB in float32 (loading alone: "
                   f"{nf4['load_gb']:.2f} vs {full['load_gb']:.2f} GB)",
    }


def run() -> dict:
    return measure()


if __name__ == "__main__":
    print(json.dumps(measure(*sys.argv[1:2]), indent=1))
