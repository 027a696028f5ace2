"""A campaign started again under its own name:
what `coordinator start` decides and says (coordinator/restart.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator import checkpoint
from coordinator.campaign import Campaign
from coordinator.restart import PreviousRun, decide, fingerprint, previous_run, set_aside
from protocol.errors import CommonsError


def campaign(tmp_path: Path, rounds: int = 2) -> Campaign:
    return Campaign(name="capitals", base_model="tiny", eval_file=tmp_path / "test.jsonl", rounds=rounds)


def left_behind(folder: Path, events: list[dict], saved_round: int = 0, print_id: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "cut sh')
    if saved_round:
        checkpoint.save(folder / "checkpoint", {"a": np.zeros(2, np.float32)},
                        {"round": saved_round, "fingerprint": print_id})


def test_a_failed_campaign_with_a_saved_round_resumes_and_says_why_it_stopped(tmp_path: Path) -> None:
    c = campaign(tmp_path)
    left_behind(tmp_path / "run",
                [{"event": "round_end"}, {"event": "error", "message": "only 0 of 2 volunteers"}],
                saved_round=1, print_id=fingerprint(c))
    previous = previous_run(tmp_path / "run", c)
    assert previous == PreviousRun(last_event="error", error="only 0 of 2 volunteers", saved_round=1,
                                   same_file=True)
    assert decide(previous, "capitals", restart=False) == (
        "resuming campaign capitals after round 1 (it stopped: only 0 of 2 volunteers); pass --restart to "
        "start over from round 1")


def test_a_failed_campaign_without_a_saved_round_or_with_a_changed_file_starts_from_round_1(
        tmp_path: Path) -> None:
    c = campaign(tmp_path)
    left_behind(tmp_path / "none", [{"event": "error", "message": "bad"}])
    assert decide(previous_run(tmp_path / "none", c), "capitals", False) == (
        "campaign capitals starts again from round 1 (it stopped: bad)")
    left_behind(tmp_path / "changed", [{"event": "waiting_for_nodes"}], saved_round=1,
                print_id=fingerprint(c))
    edited = campaign(tmp_path, rounds=3)
    assert decide(previous_run(tmp_path / "changed", edited), "capitals", False) == (
        "campaign capitals starts over from round 1: the campaign file changed since round 1 was saved")


def test_a_finished_campaign_needs_restart_which_sets_the_old_run_aside(tmp_path: Path) -> None:
    c = campaign(tmp_path)
    folder = tmp_path / "campaigns" / "capitals"
    left_behind(folder, [{"event": "campaign_end", "published": True}], saved_round=2,
                print_id=fingerprint(c))
    with pytest.raises(CommonsError,
                       match="^campaign capitals already finished on this machine: pass --restart"):
        decide(previous_run(folder, c), "capitals", False)
    assert decide(previous_run(folder, c), "capitals", True).startswith(
        "--restart: campaign capitals starts over")
    aside = set_aside(folder)
    assert (not folder.exists() and aside.name.startswith("capitals.restarted-")
            and (aside / "events.jsonl").exists())
    assert decide(previous_run(folder, c), "capitals", False) == ""  # a fresh start says nothing
