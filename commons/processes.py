"""Every process below the ones we started, so that stopping a campaign leaves none behind.

Flower's SuperLink starts `flower-superexec` in a session of its own, which starts the ServerApp: stopping
the SuperLink's process group misses both, and they would hold the campaign (and its SuperLink's
runtime port) until they notice their parent is gone. Their parentage still leads back to us.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def descendants(roots: list[int]) -> list[int]:
    """Children, grandchildren, … of `roots` now (Linux /proc; elsewhere none are found)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (name) state ppid ...": the name may hold spaces and parentheses,
            # so split after the last ")"
            text = stat.read_text()
            parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found: list[int] = []
    frontier = set(roots)
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in found]
        found += children
        frontier = set(children)
    return found


def stop(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each, then SIGKILL what is still there after `grace` seconds."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    _wait(pids, grace)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    _wait(pids, 2.0)


def _wait(pids: list[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to read its exit status."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] != "Z"
