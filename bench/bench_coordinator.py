"""Coordinator cost per volunteer: one round's real path for n volunteers' updates of a 7B shard.

    python -m bench.bench_coordinator                 # 16, 64, 256, 1024 volunteers, int8 uploads
    python -m bench.bench_coordinator 16 64 --dtype bf16
    python -m bench.bench_coordinator --one 256       # one size in this process (what run() spawns)

The adapter is Mistral-7B-v0.1's (tests/data/model_configs): q, k, v, o LoRA at r = 16 on 32 layers,
13.6 M parameters. Each volunteer trains a quarter of the layers (8, 3.4 M parameters: 3.4 MB in int8),
as a plan with n/4 lanes of 4 equal nodes gives: every layer has n/4 trainers, so each key group of the
sharded aggregation holds n/4 updates.

Per volunteer, as rounds.train_nodes does when its reply arrives: the reply is a Flower Message holding
the packed wire arrays and the signed proof; `rounds.check_reply` unpacks it, checks the signature over
update_digest (sha256 + ed25519), decodes the wire encoding against the tensors sent and checks the keys
and shapes. Then `aggregate_sharded` with the default robust rule (trimmed mean over ΔW views, per-module
and round-wide clipping). Making each reply (noise, encode, sign: the volunteer's part) is not timed.

Each size runs in a fresh process: `peak_mb` is tracemalloc's peak over the round (numpy reports its
buffers to it) above what was allocated before the first reply, `held_mb` what the verified updates hold
when the last one is in, `rss_mb` the process's peak resident set (the interpreter, numpy and flwr
included). `growth` is seconds per volunteer against the previous size's (1.0: linear).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

CONFIG = Path(__file__).resolve().parent.parent / "tests" / "data" / "model_configs" / "Mistral-7B-v0.1"
KEY = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"
RANK = 16
SIZES = (16, 64, 256, 1024)


def adapter(config: Path = CONFIG, rank: int = RANK, seed: int = 0) -> dict[str, np.ndarray]:
    """A trained-looking global adapter for the model of `config` (q, k, v, o at `rank`): A and B both
    non-zero, as after a few rounds."""
    cfg = json.loads((config / "config.json").read_text())
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (heads * head_dim, hidden)}  # (in, out)
    rng = np.random.default_rng(seed)
    g = {}
    for layer in range(cfg["num_hidden_layers"]):
        for mod, (inn, out) in shapes.items():
            g[KEY.format(layer, mod, "A")] = rng.standard_normal((rank, inn), dtype=np.float32) * 0.02
            g[KEY.format(layer, mod, "B")] = rng.standard_normal((out, rank), dtype=np.float32) * 0.002
    return g


def quarter_plan(g: dict[str, np.ndarray], volunteers: list[str]):
    """Equal CPU volunteers in n/4 lanes: each trains a quarter of the layers."""
    from coordinator.plan import layers_from_keys, make_plan

    caps = {key: {"device": "cpu", "cpu_cores": 8, "ram_gb": 32} for key in volunteers}
    return make_plan(layers_from_keys(g), caps, min_coverage=max(1, len(volunteers) // 4))


def reply(campaign, key, sent: dict[str, np.ndarray], noise: np.ndarray, rng: np.random.Generator):
    """What volunteer `key` sends back for `sent`: a Flower Message with its packed, signed update."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from protocol.packed import pack
    from protocol.update import encode, update_digest

    trained = {}
    for k, v in sent.items():
        at = int(rng.integers(0, noise.size - v.size))
        trained[k] = v + noise[at : at + v.size].reshape(v.shape)
    wire = encode(trained, sent, campaign.upload_dtype)
    proof = {"public_key": key.public_hex, "signature": key.sign(update_digest(campaign.name, 1, wire)).hex()}
    content = RecordDict({"adapter": ArrayRecord({k: Array(v) for k, v in pack(wire).items()}),
                          "metrics": ConfigRecord({"num_examples": 64, "loss": 1.0}),
                          "proof": ConfigRecord(proof)})
    return Message(content, dst_node_id=1, message_type="train"), sum(int(v.nbytes) for v in wire.values())


def one(n: int, dtype: str = "int8") -> dict:
    """One round's verification and aggregation for n volunteers, in this process."""
    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.campaign import Campaign
    from coordinator.plan import shard_keys
    from coordinator.rounds import check_reply
    from coordinator.rules import AggregateConfig
    from coordinator.rules.sharded import aggregate_sharded
    from protocol.signing.keys import Identity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp has set
    g = adapter()
    keys = sorted(g)
    campaign = Campaign(name="bench", base_model="mistral", eval_file=Path("-"), upload_dtype=dtype)
    by_node = {i.public_hex: i for i in (Identity.from_seed(n.to_bytes(32, "big")) for n in range(n))}
    plan = quarter_plan(g, list(by_node))
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(4 * 4096 * RANK * 8, dtype=np.float32) * 0.001
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    # as replies arrive: verify, decode, check (the volunteers' part is made here too, not timed)
    verify_s, wire_total, got = 0.0, 0, {}
    for s in plan.shards:
        sent = {k: g[k] for k in shard_keys(plan, s.node_id, keys)}
        message, size = reply(campaign, by_node[s.node_id], sent, noise, rng)
        wire_total += size
        start = time.perf_counter()
        checked = check_reply(message, campaign, 1, s.node_id, sent)
        verify_s += time.perf_counter() - start
        del message
        if isinstance(checked, str):
            raise ValueError(checked)  # noqa: TRY004 - a reply the bench made itself must verify
        got[s.node_id] = checked
    held = tracemalloc.get_traced_memory()[0] - before
    # aggregate per key group with the default robust rule (and its clipping)
    start = time.perf_counter()
    _, report = aggregate_sharded(g, [u for u, _ in got.values()], plan, "robust", AggregateConfig(seed=0))
    aggregate_s = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    shard = sum(g[k].size for k in shard_keys(plan, plan.shards[0].node_id, keys))
    return {"n": n, "dtype": dtype, "shard_params": shard, "verify_s": round(verify_s, 3),
            "aggregate_s": round(aggregate_s, 3), "seconds": round(verify_s + aggregate_s, 3),
            "ms_per_volunteer": round(1000 * (verify_s + aggregate_s) / n, 2),
            "wire_mb": round(wire_total / 1e6, 1), "held_mb": round(held / 1e6, 1),
            "peak_mb": round(peak / 1e6, 1),
            "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "accepted": len(report.accepted), "rejected": len(report.rejected)}


def run(sizes: tuple[int, ...] = SIZES, dtype: str = "int8") -> dict:
    """Each size in a fresh process; the table and the growth of seconds per volunteer."""
    rows = []
    for n in sizes:
        args = [sys.executable, "-m", "bench.bench_coordinator", "--one", str(n), "--dtype", dtype]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # e.g. killed for memory: the sizes before it stand
            said = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
            rows.append({"n": n, "error": said[-1]})
            break
        rows.append(json.loads(done.stdout))
    for previous, row in itertools.pairwise(rows):
        if "error" not in row:
            row["growth"] = round(row["ms_per_volunteer"] / previous["ms_per_volunteer"], 2)
    done = [r for r in rows if "error" not in r]
    worst = max((r.get("growth", 1.0) for r in done), default=1.0)
    return {"name": "coordinator_cost_per_volunteer", "ratio": worst, "rows": rows,
            "summary": ", ".join(f"n={r['n']}: {r['seconds']:.1f}s {r['peak_mb']:.0f}MB" for r in done)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("sizes", nargs="*", type=int, default=list(SIZES))
    parser.add_argument("--one", type=int)
    parser.add_argument("--dtype", default="int8", choices=("fp32", "bf16", "int8"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.dtype)))
    else:
        print(json.dumps(run(tuple(args.sizes), args.dtype), indent=1))
