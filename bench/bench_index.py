"""Index search latency over 10 000 registered adapters.

    python bench/bench_index.py            # prints JSON; run() returns the same dict

Every adapter is a real DSSE-signed manifest that goes through `IndexDB.register` (verification and
all); only the signed directory itself is skipped, since search never looks at files. Queries mix
free text (whole words, prefixes, misses) with the list page's filters.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from index.db import IndexDB
from protocol.content.multiformats import cid_for
from protocol.signing.dsse import canonical_json, envelope_bytes, sign_envelope
from protocol.signing.keys import Identity
from protocol.signing.manifest import AdapterMeta, build_statement

TASKS = ["gsm8k", "code", "chat", "summarize", "translate-de", "sql", "medical-qa", "legal", "poetry", "json"]
BASES = ["HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", "Qwen/Qwen2.5-0.5B",
         "meta-llama/Llama-3.2-1B", "google/gemma-2-2b"]
LICENSES = ["Apache-2.0", "MIT", "CC-BY-4.0", "CC-BY-NC-4.0", "OpenRAIL-M"]
WORDS = ["fast", "tiny", "math", "coder", "helper", "tutor", "polite", "german", "strict", "creative",
         "doctor"]


def _envelope(meta: AdapterMeta, identity: Identity, rng: random.Random) -> tuple[bytes, str]:
    files = [{"name": "adapter_model.safetensors", "size": rng.randint(1 << 20, 200 << 20),
              "sha256": rng.randbytes(32).hex(), "cid": str(cid_for(0x70, rng.randbytes(16), 0))}]
    payload = canonical_json(build_statement(meta, files))
    envelope = envelope_bytes(sign_envelope(payload, identity))
    return envelope, str(cid_for(0x70, envelope, 0))  # a distinct, valid root CID per entry


def populate(db: IndexDB, n: int, seed: int = 7) -> float:
    """Register n adapters from 50 publishers; returns seconds taken."""
    rng = random.Random(seed)
    publishers = [Identity.generate() for _ in range(50)]
    start = time.perf_counter()
    for i in range(n):
        task = rng.choice(TASKS)
        meta = AdapterMeta(
            name=f"{rng.choice(WORDS)}-{task}-{i}", base_model=rng.choice(BASES),
            license=rng.choice(LICENSES), campaign=f"{task}-campaign", rounds=rng.randint(1, 20),
            eval={"task": task, "description": f"{rng.choice(WORDS)} {rng.choice(WORDS)} adapter for {task}",
                  "accuracy_base": 0.2, "accuracy_adapter": round(rng.uniform(0.2, 0.6), 3)},
            ledger=[{"node": rng.choice(publishers).public_hex, "rounds": 3,
                     "tokens": rng.randint(1, 10**6)}],
        )
        db.register(*_envelope(meta, publishers[i % len(publishers)], rng))
    return time.perf_counter() - start


def queries(rng: random.Random, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.15:
            out.append({})
        elif kind < 0.45:
            out.append({"q": rng.choice(WORDS + TASKS)})
        elif kind < 0.6:
            out.append({"q": rng.choice(WORDS)[:3]})  # prefix, as typed
        elif kind < 0.7:
            out.append({"q": f"{rng.choice(WORDS)} {rng.choice(TASKS)}"})
        elif kind < 0.8:
            out.append({"q": "nonexistentword"})
        else:
            out.append({"q": rng.choice(["", rng.choice(WORDS)]), "base_model": rng.choice(BASES),
                        "license": rng.choice([None, *LICENSES]), "task": rng.choice([None, *TASKS])})
    return out


def run(n: int = 10_000, searches: int = 1_000, url: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        db = IndexDB(url or f"sqlite:///{Path(tmp) / 'index.db'}")
        populate_s = populate(db, n)
        rng = random.Random(11)
        plan = queries(rng, searches)
        for q in plan[:50]:  # warm caches the way a running server has them
            db.search(**q)
        times, hits = [], 0
        for q in plan:
            start = time.perf_counter()
            hits += len(db.search(**q))
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        db.engine.dispose()
    return {
        "adapters": n, "searches": searches, "dialect": db.dialect,
        "register_per_s": round(n / populate_s, 1),
        "search_p50_ms": round(statistics.median(times), 2),
        "search_p99_ms": round(times[int(0.99 * (len(times) - 1))], 2),
        "search_max_ms": round(times[-1], 2),
        "mean_hits": round(hits / searches, 1),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
