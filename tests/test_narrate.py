"""The coordinator's terminal lines (commons/narrate.py): one per event, from the events the runner writes."""

from __future__ import annotations

from commons.narrate import LINES, line

KEY = "7eb490658c2ee82c"
EVENTS = [
    {"event": "round_start", "round": 1, "nodes": 2, "attempt": 1, "volunteers": [KEY, "a7889627aa11bb22"]},
    {"event": "node_missing", "round": 1, "node": KEY, "reason": "it left the network: stopped, or its heartbeat lapsed"},
    {"event": "rejoined", "round": 1, "node": KEY, "node_id": 7},
    {"event": "node_ignored", "node": "flower:123", "reason": "/data/chats.jsonl:3: not JSON; fix or remove the line"},
    {"event": "round_end", "round": 1, "loss": 0.1543, "accuracy": 0.792},
]


def test_the_coordinator_sees_who_trains_drops_rejoins_and_is_left_out() -> None:
    assert [line(e) for e in EVENTS] == [
        "round 1: 2 volunteers training: 7eb49065…, a7889627…",
        "round 1: 7eb49065… dropped out (it left the network: stopped, or its heartbeat lapsed)",
        "round 1: 7eb49065… rejoined; its work is sent again",
        "left out volunteer flower:123: /data/chats.jsonl:3: not JSON; fix or remove the line",
        "round 1: loss 0.154, held-out accuracy 79.2%",
    ]


def test_the_demo_keeps_its_lines_and_unknown_or_old_events_say_nothing() -> None:
    assert [line(e, demo=True) for e in EVENTS] == [None, None, None, None, "round 1: loss 0.154, held-out accuracy 79.2%"]
    assert line({"event": "plan", "round": 1}) is None and line({"event": "round_start"}) is None
    assert "published" not in LINES  # the command prints what was published, with how to serve and pull it
