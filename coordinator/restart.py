"""A campaign started again under its own name: resume it, start it over, or refuse, said in one line.

`commons coordinator start` reads what the last run left under `$COMMONS_HOME/campaigns/NAME/` before
any process starts:

    last run ...                              plain `start`                     `start --restart`
    never ran here                            round 1                           round 1
    stopped (error, kill, Ctrl-C), checkpoint resume after the saved round      old run set aside, round 1
      of this very campaign file
    stopped before a round was saved          round 1                           old run set aside, round 1
    campaign file changed since the save      round 1 (the checkpoint is not    old run set aside, round 1
                                              this campaign's)
    finished                                  refused: pass --restart           old run set aside, round 1

"Set aside" renames the folder to NAME.restarted-YYYYmmdd-HHMMSS (events, checkpoint and adapter kept).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.campaign import Campaign
from protocol.errors import CommonsError


def fingerprint(campaign: Campaign) -> str:
    """Which campaign file a checkpoint belongs to: every setting, not where the file lies."""
    data = campaign.to_json()
    data.pop("source", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PreviousRun:
    """What the last run of a campaign left on this machine."""

    last_event: str = ""  # "" when it never ran here
    error: str = ""  # the message of its final `error` event
    saved_round: int = 0  # the round its checkpoint holds (0: none)
    same_file: bool = True  # the checkpoint was written for this very campaign file


def previous_run(folder: Path, campaign: Campaign) -> PreviousRun:
    last = _last_event(folder / "events.jsonl")
    try:
        state = json.loads((folder / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        state = {}
    return PreviousRun(last_event=str(last.get("event", "")), error=str(last.get("message", "")),
                       saved_round=int(state.get("round", 0)),
                       same_file=state.get("fingerprint", fingerprint(campaign)) == fingerprint(campaign))


def _last_event(path: Path) -> dict:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:  # a line cut short by a kill: look further back
            continue
    return {}


def decide(previous: PreviousRun, name: str, restart: bool) -> str:
    """The one line saying what this start does ("" for a campaign that never ran here).

    Raises CommonsError for a finished campaign started again without --restart."""
    if restart:
        return (f"--restart: campaign {name} starts over from round 1; its last run is set aside"
                if previous.last_event else "")
    if not previous.last_event:
        return ""
    if previous.last_event == "campaign_end" and previous.same_file:
        raise CommonsError(f"campaign {name} already finished on this machine: pass --restart to run it "
                           "again from round 1 (the old run is kept aside), "
                           "or give the campaign another name")
    why = f" (it stopped: {previous.error})" if previous.last_event == "error" else ""
    if previous.saved_round and not previous.same_file:
        return (f"campaign {name} starts over from round 1: the campaign file changed since round "
                f"{previous.saved_round} was saved{why}")
    if previous.saved_round:
        return (f"resuming campaign {name} after round {previous.saved_round}{why}; pass --restart to start "
                "over from round 1")
    return f"campaign {name} starts again from round 1{why}"


def set_aside(folder: Path) -> Path | None:
    """Rename the last run's folder out of the way (nothing is deleted); its new path, or None."""
    if not folder.exists():
        return None
    target = folder.with_name(f"{folder.name}.restarted-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(target)
    return target
