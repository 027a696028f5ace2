"""`--idle-only`: train only while nobody else is using the machine.

"In use" means other processes keep more than `busy` of all CPU cores busy, or the laptop runs on
battery. Training pauses between steps (nothing is lost; the step in flight finishes) and resumes
once the machine has stayed idle for `settle` seconds, so a short burst of activity does not make
training flap. Our own CPU time is subtracted, so the training itself never counts as "in use".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
POWER = Path("/sys/class/power_supply")


@dataclass(frozen=True)
class CpuSample:
    busy: float  # seconds all cores spent busy since boot
    total: float  # seconds all cores existed since boot (busy + idle)
    own: float  # CPU seconds this process used


def others_load(before: CpuSample, after: CpuSample) -> float:
    """Share of the machine's CPU that other processes used between two samples (0..1)."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(1.0, max(0.0, others / total))


def parse_proc_stat(text: str, ticks: float) -> tuple[float, float]:
    """(busy, total) seconds from /proc/stat's aggregate `cpu` line; idle and iowait are not busy."""
    fields = [float(x) for x in text.split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    total = sum(fields[:8])  # guest time is already inside user/nice
    return (total - idle) / ticks, total / ticks


def sample() -> CpuSample | None:
    """None where /proc/stat does not exist (macOS, Windows): there --idle-only sees only the battery."""
    try:
        busy, total = parse_proc_stat(PROC_STAT.read_text(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
    t = os.times()
    return CpuSample(busy=busy, total=total, own=t.user + t.system)


def on_battery(root: Path = POWER) -> bool:
    """True when a battery is discharging and no mains adapter is online."""
    try:
        supplies = list(root.iterdir())
    except OSError:
        return False
    mains = [p for p in supplies if _read(p / "type") == "Mains"]
    if any(_read(p / "online") == "1" for p in mains):
        return False
    return any(_read(p / "type") == "Battery" and _read(p / "status") == "Discharging" for p in supplies)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@dataclass
class IdleGate:
    """Call `check()` between training steps; it returns at once while the machine is idle."""

    busy: float = 0.30
    idle: float = 0.15
    settle: float = 10.0
    interval: float = 1.0
    sampler: Callable[[], CpuSample | None] = sample
    battery: Callable[[], bool] = on_battery
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._last = self.sampler()
        self._at = self.clock()
        self.paused_seconds = 0.0

    def reason(self, fresh: bool = False) -> str | None:
        """Why the machine counts as in use right now, or None; samples at most every `interval` s
        (`fresh`: wait for a full interval rather than answer from an older sample)."""
        if self.battery():
            return "on battery"
        if fresh and self.clock() - self._at < self.interval:
            self.sleep(self.interval - (self.clock() - self._at))
        now = self.clock()
        if now - self._at < self.interval or self._last is None:
            return None
        current = self.sampler()
        if current is None:
            return None
        load = others_load(self._last, current)
        self._last, self._at = current, now
        return f"other programs use {load:.0%} of the CPU" if load > self.busy else None

    def check(self, on_pause: Callable[[str], None] = lambda why: None, fresh: bool = False) -> None:
        why = self.reason(fresh)
        if why is None:
            return
        on_pause(why)
        started = self.clock()
        quiet_since = None
        while quiet_since is None or self.clock() - quiet_since < self.settle:
            self.sleep(self.interval)
            current = self.sampler()
            load = others_load(self._last, current) if current and self._last else 0.0
            self._last, self._at = current, self.clock()
            still = self.battery() or load > self.idle
            quiet_since = None if still else (quiet_since or self.clock())
        self.paused_seconds += self.clock() - started


def gate_from_env() -> IdleGate:
    """Thresholds can be tuned with COMMONS_IDLE_BUSY / _IDLE / _SETTLE (tests use a short settle)."""
    env = os.environ
    return IdleGate(busy=float(env.get("COMMONS_IDLE_BUSY", 0.30)),
                    idle=float(env.get("COMMONS_IDLE_IDLE", 0.15)),
                    settle=float(env.get("COMMONS_IDLE_SETTLE", 10.0)))
