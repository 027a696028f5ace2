"""The coordinator's terminal lines (commons/narrate.py): one per event, from the events the runner writes."""

from __future__ import annotations

from commons.narrate import LINES, RoundClock, duration, line, stamped

KEY = "7eb490658c2ee82c"
EVENTS = [
    {"event": "round_start", "round": 1, "nodes": 2, "attempt": 1, "volunteers": [KEY, "a7889627aa11bb22"]},
    {"event": "node_missing", "round": 1, "node": KEY,
     "reason": "it left the network: stopped, or its heartbeat lapsed"},
    {"event": "rejoined", "round": 1, "node": KEY, "node_id": 7},
    {"event": "node_ignored", "node": "flower:123",
     "reason": "/data/chats.jsonl:3: not JSON; fix or remove the line"},
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
    assert [line(e, demo=True) for e in EVENTS] == [None, None, None, None,
                                                    "round 1: loss 0.154, held-out accuracy 79.2%"]
    assert line({"event": "plan", "round": 1}) is None and line({"event": "round_start"}) is None
    assert "published" not in LINES  # the command prints what was published, with how to serve and pull it


def test_each_line_says_when_and_a_round_end_says_how_long_the_round_took() -> None:
    clock = RoundClock()
    start = {"event": "round_start", "round": 2, "nodes": 1, "volunteers": [KEY], "time": 1_000.0}
    end = {"event": "round_end", "round": 2, "loss": 0.5, "accuracy": 0.5, "time": 1_213.4}
    assert clock.timed(start) == start
    assert line(clock.timed(end)) == "round 2: loss 0.500, held-out accuracy 50.0% (round took 3 min 33 s)"
    assert stamped(end, "x")[2] == ":" and stamped(end, "x")[5] == ":" and stamped(end, "x").endswith(" x")
    assert stamped({"event": "round_end"}, "x") == "x"
    assert [duration(s) for s in (0.4, 59, 60, 3599, 3720)] == ["0 s", "59 s", "1 min 00 s", "59 min 59 s",
                                                                  "1 h 02 min"]
