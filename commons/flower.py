"""Start real Flower processes (SuperLink, SuperNodes) and submit a run: the deployment engine, not simulation."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import CommonsError

APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lora-commons-campaign"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lora-commons"

[tool.flwr.app.components]
serverapp = "coordinator.server_app:app"
clientapp = "node.client_app:app"

[tool.flwr.app.config]
campaign = ""
home = ""
"""


LOCAL = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}  # bind-all addresses → the loopback this machine dials


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise CommonsError(f"{what} exited with code {proc.returncode}: {' '.join(tail)[:300]} (log: {log})")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise CommonsError(f"{what} did not open port {port} within {timeout:.0f}s (log: {log})")


def _bin(name: str) -> str:
    """Console scripts of the running interpreter's environment first, so a venv works unactivated."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _env(extra: dict[str, str]) -> dict[str, str]:
    """Flower's processes start further Flower processes by name: put our interpreter's scripts first."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Network:
    """Processes this object started; `close()` stops them all (also on errors).

    With `ca` (a root certificate) everything speaks TLS: the SuperLink gets its certificate arguments in
    `extra` instead of `--insecure`, the `flwr` config trusts `ca`, SuperNodes verify the SuperLink with it.
    """

    workdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    address: str = ""
    ca: Path | None = None

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        out = log.open("ab")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=_env(env),
                                start_new_session=True, cwd=self.workdir)
        self.procs.append(proc)
        return proc, log

    def start_superlink(self, host: str = "127.0.0.1", port: int | None = None,
                        env: dict[str, str] | None = None, extra: list[str] | None = None) -> str:
        """One HTTP port serves the Fleet API (nodes), the Control API (`flwr run`) and the runtime."""
        port = port or free_port()
        # in-memory state: the SQLite file backend answers "database is locked" under concurrent nodes,
        # and the campaign's own checkpoints are what survives a restart
        security = [] if self.ca else ["--insecure"]
        args = [_bin("flower-superlink"), *security, "--host", host, "--port", str(port), *(extra or [])]
        proc, log = self._spawn("superlink", args, env or {})
        wait_port(host, port, proc, 60, "flower-superlink", log)
        # what this machine dials: a certificate never names 0.0.0.0 (Flower's own runtime does the same)
        self.address = f"{LOCAL.get(host, host)}:{port}" if self.ca else f"{host}:{port}"
        return self.address

    def start_supernode(self, name: str, superlink: str, node_config: dict[str, str | int],
                        env: dict[str, str] | None = None, extra: list[str] | None = None,
                        insecure: bool = True, auth_key: Path | None = None) -> subprocess.Popen:
        """With `ca` on the network: TLS, and `auth_key` (the Flower ECDSA key) signs in to a closed campaign."""
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
        if self.ca:
            security = ["--root-certificates", str(self.ca)]
            security += ["--auth-supernode-private-key", str(auth_key)] if auth_key else []
        else:
            security = ["--insecure"] if insecure else []
        args = [_bin("flower-supernode"), *security, "--superlink", superlink,
                "--port", str(free_port()), "--node-config", cfg, *(extra or [])]
        proc, _ = self._spawn(name, args, env or {})
        return proc

    def flwr_home(self) -> Path:
        home = self.workdir / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{self.ca}"' if self.ca else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "commons"\n\n[superlink.commons]\naddress = "{self.address}"\n{security}\n'
        )
        return home

    def app_dir(self) -> Path:
        """A Flower app that names our installed modules: no source is shipped inside the FAB."""
        app = self.workdir / "app"
        app.mkdir(parents=True, exist_ok=True)
        (app / "pyproject.toml").write_text(APP_TOML)
        return app

    def submit(self, run_config: dict[str, str], env: dict[str, str] | None = None) -> int:
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        args = [_bin("flwr"), "run", str(self.app_dir()), "commons", "--run-config", cfg, "--format", "json"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=self.workdir, check=False,
                              env=_env({"FLWR_HOME": str(self.flwr_home()), **(env or {})}))
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success", False):
            detail = reply.get("error-message") or (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            raise CommonsError(f"`flwr run` could not submit the campaign: {str(detail)[:300]}")
        return int(reply["run-id"])

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, 15)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        self.procs.clear()
