"""How much of each round the volunteers spend in training steps: `commons demo --json`'s "utilization".

    python -m bench utilization                 # `make bench`: the tiny model, 2 volunteers, 3 rounds
    python bench/bench_utilization.py smollm2   # the real demo model (minutes)

utilization = the mean over nodes and rounds ≥ 2 of (seconds in training steps) ÷ (round wall time)
(commons/timing.py; round 1 pays the model load). The demo runs with real Flower processes in a
temporary COMMONS_HOME that shares this machine's model cache. On the tiny model a step takes
milliseconds, so its figure is mostly the round's fixed cost (Flower's delivery, the upload, aggregation,
evaluation): the floor under the SmolLM2 demo's figure, whose goal is ≥ 0.80. When this home holds a
finished SmolLM2 demo (`make demo`), its figure is added as `last_smollm2_demo`, read from its event log
with the time it ran: not measured in this run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from commons import timing
from modeling.load import cache_dir
from protocol.home import home

COMMONS = str(Path(sys.executable).parent / "commons")
NODES, ROUNDS, STEPS = 2, 3, 8


def demo(model: str) -> dict:
    """`commons demo --json` in a fresh home; raises RuntimeError with its last line of stderr."""
    args = [COMMONS, "demo", "--base-model", model, "--nodes", str(NODES), "--rounds", str(ROUNDS),
            "--steps", str(STEPS), "--json"]
    with tempfile.TemporaryDirectory(prefix="bench-utilization-") as folder:
        env = {**os.environ, "COMMONS_HOME": folder, "COMMONS_CACHE": str(cache_dir())}
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800, check=False,
                              cwd=folder)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise RuntimeError(f"commons demo failed: {last[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def last_smollm2_demo() -> dict | None:
    """The utilization of the last SmolLM2 demo run in this home, from its events; None when there is none."""
    events = home() / "campaigns" / "dates-iso-smollm2" / "events.jsonl"
    if not events.is_file():
        return None
    times = timing.round_times([json.loads(line) for line in events.read_text().splitlines() if line.strip()])
    if not times:
        return None
    ran = time.strftime("%Y-%m-%d %H:%M", time.localtime(events.stat().st_mtime))
    return {**timing.summary(times), "ran": ran}


def measure(model: str = "tiny") -> dict:
    summary = demo(model)
    figure = summary.get("utilization")
    result = {
        "name": "bench_utilization", "utilization": figure, "goal": 0.80, "model": model,
        "nodes": NODES, "rounds": ROUNDS, "steps": STEPS,
        "round_seconds": summary.get("round_seconds"), "train_seconds": summary.get("train_seconds"),
        "load_seconds": summary.get("load_seconds"),
        "summary": f"utilization {figure} over rounds ≥ 2 of a {model} demo; rounds took "
                   f"{summary.get('round_seconds')} s",
    }
    earlier = last_smollm2_demo() if model == "tiny" else None
    if earlier is not None:
        result["last_smollm2_demo"] = earlier
        result["summary"] += f"; last SmolLM2 demo ({earlier['ran']}): {earlier['utilization']}"
    return result


def run() -> dict:
    return measure()


if __name__ == "__main__":
    print(json.dumps(measure(*sys.argv[1:2]), indent=1))
