"""CID throughput vs plain sha256 over the same in-memory bytes (the floor: one hash pass is unavoidable).

Run: `.venv/bin/python bench/bench_cid.py` (about 256 MB of RAM, a few seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from protocol.content import unixfs

SIZE = 256 << 20


def run(size: int = SIZE, repeats: int = 5) -> dict:
    data = os.urandom(size)
    view = memoryview(data)
    jobs = {
        "sha": lambda: hashlib.sha256(view).digest(),
        "v0": lambda: unixfs.file_cid(view, 0),
        "v1": lambda: unixfs.file_cid(view, 1),
    }
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(repeats):  # interleaved, best of: the CPU is shared, so noise only ever slows a run
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            best[name] = min(best[name], time.perf_counter() - start)
    sha, v0, v1 = best["sha"], best["v0"], best["v1"]
    mb = size / 1e6
    return {
        "name": "cid_vs_sha256",
        "ratio": round(sha / v0, 3),  # CIDv0 (the default): dag-pb leaves, the slower of the two
        "ratio_v1": round(sha / v1, 3),
        "cid_mb_s": round(mb / v0, 1),
        "cid_v1_mb_s": round(mb / v1, 1),
        "sha256_mb_s": round(mb / sha, 1),
        "bytes": size,
    }


if __name__ == "__main__":
    print(json.dumps(run()))
