"""`--idle-only`: the node pauses between steps while other programs load the CPU, and resumes after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from node import idle

CORES = os.cpu_count() or 1


def test_others_load_subtracts_our_own_cpu_time() -> None:
    before = idle.CpuSample(busy=100.0, total=400.0, own=10.0)
    after = idle.CpuSample(busy=106.0, total=408.0, own=14.0)  # 8 core-seconds passed, 6 busy, 4 of them ours
    assert idle.others_load(before, after) == pytest.approx(2 / 8)
    assert idle.others_load(after, after) == 0.0


def test_proc_stat_counts_idle_and_iowait_as_not_busy() -> None:
    busy, total = idle.parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n", ticks=100)
    assert (busy, total) == (1.5, 10.0)


def _supply(root: Path, name: str, **files: str) -> None:
    (root / name).mkdir(parents=True)
    for key, value in files.items():
        (root / name / key).write_text(value + "\n")


def test_battery_counts_only_when_discharging_without_mains(tmp_path: Path) -> None:
    assert idle.on_battery(tmp_path / "absent") is False
    _supply(tmp_path, "BAT0", type="Battery", status="Discharging")
    assert idle.on_battery(tmp_path) is True
    _supply(tmp_path, "AC", type="Mains", online="1")
    assert idle.on_battery(tmp_path) is False


class FakeMachine:
    """A clock and a CPU whose other-program load follows a schedule: [(until_second, load), ...]."""

    def __init__(self, schedule: list[tuple[float, float]]) -> None:
        self.now, self.ticks, self.busy, self.schedule = 0.0, 0, 0.0, schedule

    def load(self) -> float:
        return next((load for until, load in self.schedule if self.now < until), 0.0)

    def sleep(self, seconds: float) -> None:
        for _ in range(round(seconds * 10)):  # tenths of a second, counted exactly
            self.busy += self.load() * 0.1
            self.ticks += 1
            self.now = self.ticks / 10

    def sample(self) -> idle.CpuSample:
        return idle.CpuSample(busy=self.busy, total=self.now, own=0.0)

    def gate(self) -> idle.IdleGate:
        return idle.IdleGate(settle=5.0, interval=1.0, sampler=self.sample, battery=lambda: False,
                             sleep=self.sleep, clock=lambda: self.now)


def test_gate_pauses_while_busy_and_resumes_after_a_quiet_settle() -> None:
    machine = FakeMachine([(2.0, 0.0), (20.0, 0.9)])  # someone starts working at t=2 and stops at t=20
    gate = machine.gate()
    pauses: list[str] = []
    machine.sleep(1.5)
    gate.check(pauses.append)
    assert pauses == []  # idle: returns at once
    machine.sleep(1.5)
    gate.check(pauses.append)
    assert pauses == ["other programs use 60% of the CPU"]
    assert 20.0 + 5.0 <= machine.now <= 20.0 + 5.0 + 2.0  # back only after 5 quiet seconds
    assert gate.paused_seconds == pytest.approx(machine.now - 3.0)


def test_a_short_lull_does_not_end_the_pause() -> None:
    machine = FakeMachine([(1.0, 0.9), (3.0, 0.0), (10.0, 0.9)])  # a 2 s lull inside a busy spell
    gate = machine.gate()
    machine.sleep(1.0)
    gate.check()
    assert machine.now >= 15.0


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def test_real_cpu_load_of_other_processes_is_seen() -> None:
    procs = _busy(max(1, CORES // 2))
    try:
        first = idle.sample()
        time.sleep(1.0)
        load = idle.others_load(first, idle.sample())
    finally:
        _stop(procs)
    assert load > 0.8 * (max(1, CORES // 2) / CORES) - 0.05


@pytest.mark.slow
def test_training_pauses_for_a_busy_machine_and_finishes_after(tmp_path: Path, monkeypatch) -> None:
    from commons.demo_task import write_demo_data
    from coordinator import campaign as campaigns
    from coordinator.rounds import train_instruction
    from modeling.load import load_base
    from modeling.lora import get_state, wrap
    from node.settings import NodeSettings
    from node.worker import train_round

    data = write_demo_data(tmp_path / "data", 1, 16, 4)
    (tmp_path / "c.toml").write_text(f'name = "idle"\nbase_model = "tiny"\neval_file = "{data["test"]}"\n'
                                     "[train]\nsteps = 6\nbatch_size = 2\nmax_length = 48\n")
    campaign = campaigns.load(tmp_path / "c.toml")
    config = replace(train_instruction(campaign, 1, []), keys=None)  # the whole adapter
    base, _ = load_base("tiny", campaign.base_revision)
    tensors = get_state(wrap(base, dict(config.lora)))
    home = tmp_path / "node"
    home.mkdir()
    settings = NodeSettings(home=home, data=data["train"][0], threads=1, idle_only=True)
    monkeypatch.setenv("COMMONS_IDLE_SETTLE", "1")
    monkeypatch.setenv("COMMONS_IDLE_BUSY", str(0.4 * max(1, CORES // 2) / CORES))
    procs = _busy(max(1, CORES // 2))
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(out=train_round(settings, config, tensors)))
    try:
        time.sleep(1.2)  # let the gate's first one-second sample see the load
        worker.start()
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline and seen is None:
            try:
                state = json.loads((home / "status.json").read_text())
            except (OSError, ValueError):
                state = {}
            seen = state if state.get("state") == "paused" else None
            time.sleep(0.1)
        assert seen is not None, "the node never paused while the CPU was busy"
        assert "of the CPU" in seen["reason"]
        assert worker.is_alive()  # paused, not finished
    finally:
        _stop(procs)
    worker.join(60)
    assert not worker.is_alive()
    _wire, metrics, _proof = result["out"]
    assert json.loads((home / "status.json").read_text())["state"] == "sent"
    assert metrics["num_examples"] == 12  # all 6 steps ran
