"""`make bench`: every benchmark's figures, measured in this run, as JSON (bench.json) and a short table.

Each bench/bench_*.py exposes `run() -> dict` with at least "name"; most report a "ratio" against a
reference measured in the same run, so machine noise cancels. A benchmark that cannot run here (no GPU)
reports {"skipped": reason}.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

import bench

# The headline figure of a result, by the first of these keys it has, and its unit in the table.
FIGURES = {"ratio": "", "utilization": "busy", "search_p99_ms": "p99 ms", "mb_per_s": "MB/s"}


def main(argv: list[str]) -> int:
    only = set(argv)
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    results = []
    for name in names:
        if only and name.removeprefix("bench_") not in only and name not in only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = importlib.import_module(f"bench.{name}").run()
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            result = {"name": name,
                      "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        result.setdefault("name", name)
        result["seconds"] = round(time.perf_counter() - start, 1)
        results.append(result)
    Path("bench.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, default=str))
    print(f"\n{'benchmark':34} {'figure':>12}  detail")
    for r in results:
        key = next((k for k in FIGURES if k in r), "")
        figure = r.get(key, "")
        unit = FIGURES.get(key, "")
        shown = f"{figure:.3f}" if isinstance(figure, float) else str(figure)
        detail = r.get("error") or r.get("skipped") or r.get("summary") or r.get("note") or unit
        print(f"{r['name']:34} {shown:>12}  {detail}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
