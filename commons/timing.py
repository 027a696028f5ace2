"""Where a campaign's round time went, from the coordinator's events alone (pure functions).

Each `update` event carries the node's own clock: `seconds` in training steps, `load_seconds` getting
the base model ready (≈ 0 when the runner kept it warm), `task_seconds` for the whole message. A
round's wall time runs from `round_start` to `round_end`; what is neither training nor loading is
waiting: Flower's delivery, the upload, the other nodes, aggregation and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean


@dataclass(frozen=True)
class RoundTime:
    round: int
    wall: float
    train: float  # mean over the round's nodes
    load: float
    nodes: int

    @property
    def wait(self) -> float:
        return max(0.0, self.wall - self.train - self.load)

    @property
    def utilization(self) -> float:
        return self.train / self.wall if self.wall > 0 else 0.0


def round_times(events: list[dict]) -> list[RoundTime]:
    """One RoundTime per round that ended, in order (a resumed round counts from its last start)."""
    starts: dict[int, float] = {}
    updates: dict[int, list[dict]] = {}
    out = []
    for event in events:
        kind, number = event.get("event"), event.get("round")
        if kind == "round_start":
            starts[number] = event["time"]
            updates[number] = []
        elif kind == "update" and number in updates:
            updates[number].append(event)
        elif kind == "round_end" and number in starts:
            got = updates.get(number) or [{}]
            out.append(RoundTime(round=number, wall=event["time"] - starts[number],
                                 train=fmean(float(u.get("seconds") or 0) for u in got),
                                 load=fmean(float(u.get("load_seconds") or 0) for u in got), nodes=len(got)))
    return out


def utilization(times: list[RoundTime], skip_first: bool = True) -> float | None:
    """Mean over rounds (from round 2: round 1 pays the model load) of training time ÷ round wall time."""
    kept = [t for t in times if t.round >= 2] if skip_first else times
    return round(fmean(t.utilization for t in kept), 3) if kept else None


def summary(times: list[RoundTime]) -> dict:
    """What `commons demo --json` reports."""
    return {"utilization": utilization(times), "round_seconds": [round(t.wall, 1) for t in times],
            "train_seconds": [round(t.train, 1) for t in times],
            "load_seconds": [round(t.load, 1) for t in times]}


def line(t: RoundTime) -> str:
    return (f"round {t.round} took {t.wall:.0f} s: training {t.train:.0f} s, loading {t.load:.0f} s, "
            f"waiting {t.wait:.0f} s ({t.utilization:.0%} busy)")
