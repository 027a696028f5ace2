"""bench/bench_utilization.py: the last SmolLM2 demo's utilization, read from its event log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_utilization


def write_events(home: Path, events: list[dict]) -> None:
    folder = home / "campaigns" / "dates-iso-smollm2"
    folder.mkdir(parents=True)
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_the_last_smollm2_demo_is_read_from_its_events_from_round_two(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMONS_HOME", str(tmp_path))
    write_events(tmp_path, [
        {"event": "round_start", "round": 1, "time": 0.0}, {"event": "update", "round": 1, "seconds": 2.0},
        {"event": "round_end", "round": 1, "time": 10.0},
        {"event": "round_start", "round": 2, "time": 10.0}, {"event": "update", "round": 2, "seconds": 8.0},
        {"event": "round_end", "round": 2, "time": 20.0},
    ])
    earlier = bench_utilization.last_smollm2_demo()
    assert earlier is not None
    assert earlier["utilization"] == 0.8 and earlier["round_seconds"] == [10.0, 10.0]
    assert earlier["ran"]


def test_without_a_smollm2_demo_in_this_home_nothing_earlier_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMONS_HOME", str(tmp_path))
    assert bench_utilization.last_smollm2_demo() is None
