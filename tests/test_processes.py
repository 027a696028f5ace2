"""Stopping what a command started, however deep (commons/processes.py): Flower's superexec and ServerApp
run in sessions of their own, below the SuperLink."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from commons.processes import descendants, stop


def test_a_grandchild_in_its_own_session_is_found_and_stopped(tmp_path: Path) -> None:
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path)
    deadline = time.monotonic() + 20
    while len(descendants([parent.pid])) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    below = descendants([parent.pid])
    assert len(below) == 1
    parent.kill()
    parent.wait()
    stop(below, grace=5)
    assert (not Path(f"/proc/{below[0]}").exists()
            or "Z" in Path(f"/proc/{below[0]}/stat").read_text().split(")")[-1][:3])
