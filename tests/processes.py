"""What a test's child process prints first: the JSON line a seeder or a Helia peer announces itself with."""

from __future__ import annotations

import selectors
import subprocess


def first_line(proc: subprocess.Popen, what: str, timeout: float = 60) -> str:
    """The first line `proc` prints on stdout (opened with text=True); an AssertionError carrying the end of
    its stderr when it prints nothing within `timeout` seconds (it is killed) or exits first."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    if not selector.select(timeout):
        proc.kill()
        raise AssertionError(f"{what} printed nothing in {timeout}s: {proc.stderr.read()[-3000:]}")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"{what} exited: {proc.stderr.read()[-3000:]}")
    return line
