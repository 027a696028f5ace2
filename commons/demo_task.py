"""The demo's task: rewrite a date written in any common style as ISO 8601 (YYYY-MM-DD).

Small models read dates fine but rarely answer in the exact format a program needs, which is what a
LoRA fixes fast. Each volunteer sees other input styles (non-IID), and the held-out test mixes them all.
Records are chat `messages` JSONL with a licence and source, the format of the data commons.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path

SYSTEM = "Answer with the date only."
PROMPT = "Write this date as YYYY-MM-DD: {}"
LICENSE = "CC0-1.0"
SOURCE = "lora-commons demo generator (synthetic)"


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# Three families of styles, one per volunteer in the demo.
STYLES: dict[str, list[Callable[[dt.date], str]]] = {
    "spelled": [
        lambda d: f"{d:%B} {d.day}, {d.year}",
        lambda d: f"{d.day} {d:%B} {d.year}",
        lambda d: f"the {_ordinal(d.day)} of {d:%B}, {d.year}",
        lambda d: f"{d:%A}, {d:%B} {d.day}, {d.year}",
    ],
    "abbreviated": [
        lambda d: f"{d:%b} {d.day}, {d.year}",
        lambda d: f"{d.day}-{d:%b}-{d.year}",
        lambda d: f"{d:%b}. {_ordinal(d.day)} {d.year}",
        lambda d: f"{d.day} {d:%b} {d.year}",
    ],
    "numeric": [
        lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
        lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
        lambda d: f"{d.year}{d.month:02d}{d.day:02d}",
        lambda d: f"{d.year}.{d.month}.{d.day}",
    ],
}


def _random_date(rng: random.Random) -> dt.date:
    start = dt.date(1950, 1, 1).toordinal()
    return dt.date.fromordinal(rng.randrange(start, dt.date(2049, 12, 31).toordinal()))


def record(date: dt.date, style: Callable[[dt.date], str]) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROMPT.format(style(date))},
            {"role": "assistant", "content": date.isoformat()},
        ],
        "license": LICENSE,
        "source": SOURCE,
    }


def make_records(n: int, families: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    styles = [style for family in families for style in STYLES[family]]
    return [record(_random_date(rng), rng.choice(styles)) for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def write_demo_data(folder: Path, nodes: int, per_node: int, test_size: int, seed: int = 0) -> dict:
    """Train files split non-IID (node i sees style family i mod 3) and one mixed held-out test file."""
    families = list(STYLES)
    train = [
        write_jsonl(folder / f"node{i}.jsonl",
                    make_records(per_node, [families[i % len(families)]], seed + 1 + i))
        for i in range(nodes)
    ]
    test = write_jsonl(folder / "test.jsonl", make_records(test_size, families, seed + 1000))
    return {"train": train, "test": test}
