"""bench/bench_nf4_memory.py: the ratio is of measured peaks, at the demo's campaign shape."""

from __future__ import annotations

import pytest

from bench import bench_nf4_memory


def test_the_nf4_ratio_is_the_measured_peaks_ratio_at_the_demo_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def fake(model_id: str, case: tuple) -> dict:
        asked.append(case)
        nf4 = case[0] == "nf4"
        return {"measured_gb": 0.6 if nf4 else 1.2, "predicted_gb": 0.5 if nf4 else 1.0,
                "weights_gb": 0.2 if nf4 else 0.8}

    monkeypatch.setattr(bench_nf4_memory, "measure_peak", fake)
    result = bench_nf4_memory.measure("tiny")
    assert asked == [("none", False, 8, 8, 96), ("nf4", False, 8, 8, 96)]
    assert (result["ratio"], result["predicted_ratio"], result["weights_ratio"]) == (0.5, 0.5, 0.25)
    assert result["rss_ratio"] is None  # not reported: not made up
