"""A coordinator killed at any moment resumes from a complete round."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator import checkpoint


def test_round_trip_and_only_the_latest_weights_are_kept(tmp_path: Path) -> None:
    for round_ in (1, 2):
        checkpoint.save(tmp_path, {"a": np.full((2, 3), round_, np.float32)},
                        {"round": round_, "fingerprint": "f"})
    tensors, state = checkpoint.load(tmp_path, "f")
    assert state["round"] == 2 and np.all(tensors["a"] == 2)
    assert [p.name for p in tmp_path.glob("global-*")] == ["global-2.safetensors"]


def test_another_campaign_or_nothing_starts_fresh(tmp_path: Path) -> None:
    assert checkpoint.load(tmp_path, "f") is None
    checkpoint.save(tmp_path, {"a": np.zeros(2, np.float32)}, {"round": 1, "fingerprint": "f"})
    assert checkpoint.load(tmp_path, "other") is None


def test_a_crash_between_weights_and_state_leaves_the_previous_round(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, {"a": np.ones(2, np.float32)}, {"round": 1, "fingerprint": "f"})
    (tmp_path / "global-2.safetensors").write_bytes(b"half-written")  # killed before the state was replaced
    tensors, state = checkpoint.load(tmp_path, "f")
    assert state["round"] == 1 and np.all(tensors["a"] == 1)
