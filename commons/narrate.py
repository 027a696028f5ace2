"""What a coordinator's terminal says while a campaign runs: one line per event of its events.jsonl.

The runner writes the events (coordinator/runner.py, coordinator/rounds.py); `commons coordinator start`
and `commons demo` follow the file and print these lines, so a coordinator sees who trains, who dropped
out or came back, who was left out and why, and each round's eval, as it happens:

    14:02:07 round 1: 2 volunteers training: 3f2a9c01…, 8be41d7e…
    14:03:12 round 1: 3f2a9c01… dropped out (it left the network: stopped, or its heartbeat lapsed)
    14:03:15 round 1: 3f2a9c01… rejoined; its work is sent again
    14:05:40 round 1: loss 0.154, held-out accuracy 79.2% (round took 3 min 33 s)

Each line starts with the event's local time (`stamped`), so a coordinator reading back sees how long
things took; a round's end says how long the round took, from its first event to its last.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# the lines `commons demo` has always shown; the coordinator shows every line below
DEMO_EVENTS = ("base_eval", "round_end", "update_dropped")


def _node(key: str) -> str:
    return key if key.startswith("flower:") else f"{key[:8]}…"


def _nodes(keys: list[str]) -> str:
    return ", ".join(_node(k) for k in keys)


def _mb(size: object) -> str:
    return f"{int(size) / 1e6:.1f} MB" if isinstance(size, int | float) else "? MB"


def _round_start(e: dict) -> str:
    again = f" (try {e['attempt']})" if e.get("attempt", 1) > 1 else ""
    n = e["nodes"]
    return (f"round {e['round']}{again}: {n} volunteer{'s' * (n != 1)} training: "
            f"{_nodes(e.get('volunteers', []))}")


def _update(e: dict) -> str:
    loss = f"loss {e['loss']:.3f}, " if isinstance(e.get("loss"), int | float) else ""
    resumed = f", resumed at step {e['resumed_from']}" if e.get("resumed_from") else ""
    return (f"round {e['round']}: {_node(e['node'])} sent its update "
            f"({loss}{_mb(e.get('upload_bytes'))}{resumed})")


def duration(seconds: float) -> str:
    """'42 s', '3 min 33 s', '1 h 02 min': how long, as a person says it."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _joined(e: dict) -> str:
    took = f", {duration(e['seconds'])} after its node started" if e.get("seconds") else ""
    return f"round {e['round']}: {_node(e['node'])} joined: its first update is accepted{took}"


def _round_end(e: dict) -> str:
    loss = f"loss {e['loss']:.3f}, " if isinstance(e.get("loss"), int | float) else ""
    took = (f" (round took {duration(e['round_seconds'])})" if isinstance(e.get("round_seconds"), int | float)
            else "")
    return f"round {e['round']}: {loss}held-out accuracy {e['accuracy']:.1%}{took}"


LINES: dict[str, Callable[[dict], str]] = {
    "resumed": lambda e: f"resumed after round {e['round']} from the campaign's checkpoint",
    "base_eval": lambda e: f"base model held-out accuracy {e['accuracy']:.1%} (n={e['n']})",
    "waiting_for_nodes": lambda e: (f"round {e.get('round', '?')}: waiting for volunteers: {e['have']} of "
                                    f"{e['want']} ready ({e.get('connected', e['have'])} connected)"),
    "node_ignored": lambda e: f"left out volunteer {_node(e['node'])}: {e['reason']}",
    "round_start": _round_start,
    "coverage_short": lambda e: f"round {e['round']}: warning: {e['reason']}",
    "update": _update,
    "update_dropped": lambda e: f"dropped an update: {e['reason']}",
    "node_missing": lambda e: f"round {e['round']}: {_node(e['node'])} dropped out ({e['reason']})",
    "waiting_for_rejoin": lambda e: (f"round {e['round']}: waiting up to {e['seconds']}s for "
                                     f"{_nodes(e['nodes'])} to rejoin"),
    "rejoined": lambda e: f"round {e['round']}: {_node(e['node'])} rejoined; its work is sent again",
    "joined": _joined,
    "reassigned": lambda e: (f"round {e['round']}: the layers of {_nodes(e['dropped'])} go to "
                             f"{_nodes(list(e['to'])) or 'no one'}"),
    "round_short": lambda e: (f"round {e['round']}: {e['got']} of min_nodes={e['want']} valid updates; "
                              "waiting for volunteers to try the round again"),
    "round_end": _round_end,
    "early_stop": lambda e: f"stopping early: {e['reason']}",
    "not_published": lambda e: f"not published: {e['reason']}",
}


def line(event: dict, demo: bool = False) -> str | None:
    """The line for one event, or None for events the terminal does not show."""
    kind = event.get("event", "")
    if demo and kind not in DEMO_EVENTS:
        return None
    say = LINES.get(kind)
    try:
        return say(event) if say else None
    except (KeyError, TypeError, ValueError):  # an event from an older runner: no line rather than a crash
        return None


def stamped(event: dict, said: str) -> str:
    """`said` after the event's local wall-clock time (HH:MM:SS); unchanged for an event without one."""
    when = event.get("time")
    if not isinstance(when, int | float):
        return said
    return f"{time.strftime('%H:%M:%S', time.localtime(when))} {said}"


class RoundClock:
    """When each round began (its first event), so its end can say how long it took."""

    def __init__(self) -> None:
        self.began: dict[int, float] = {}

    def timed(self, event: dict) -> dict:
        """The event, with `round_seconds` added to a round_end."""
        round_, when = event.get("round"), event.get("time")
        if not isinstance(round_, int) or not isinstance(when, int | float):
            return event
        began = self.began.setdefault(round_, when)
        return {**event, "round_seconds": when - began} if event.get("event") == "round_end" else event
