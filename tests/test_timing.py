"""Where a round's time went, from the coordinator's events (commons/timing.py)."""

from __future__ import annotations

import pytest

from commons.timing import line, round_times, summary, utilization


def events() -> list[dict]:
    return [
        {"event": "round_start", "round": 1, "time": 100.0},
        {"event": "update", "round": 1, "time": 150.0, "seconds": 20.0, "load_seconds": 25.0},
        {"event": "update", "round": 1, "time": 151.0, "seconds": 22.0, "load_seconds": 27.0},
        {"event": "round_end", "round": 1, "time": 152.0},
        {"event": "round_start", "round": 2, "time": 152.0},
        {"event": "update", "round": 2, "time": 175.0, "seconds": 21.0, "load_seconds": 0.0},
        {"event": "update", "round": 2, "time": 176.0, "seconds": 23.0, "load_seconds": 0.0},
        {"event": "round_end", "round": 2, "time": 177.0},
    ]


def test_round_times_split_wall_time_into_training_loading_and_waiting() -> None:
    first, second = round_times(events())
    assert (first.wall, first.train, first.load, first.nodes) == (52.0, 21.0, 26.0, 2)
    assert first.wait == pytest.approx(5.0)
    assert second.utilization == pytest.approx(22.0 / 25.0)
    assert line(second) == "round 2 took 25 s: training 22 s, loading 0 s, waiting 3 s (88% busy)"


def test_utilization_skips_round_one_which_pays_the_model_load() -> None:
    times = round_times(events())
    assert utilization(times) == 0.88
    assert utilization(times, skip_first=False) == round((21 / 52 + 22 / 25) / 2, 3)
    assert summary(times)["round_seconds"] == [52.0, 25.0]


def test_a_round_that_never_ended_is_not_counted() -> None:
    assert round_times(events()[:3]) == []
    assert utilization([]) is None
