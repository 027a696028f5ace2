"""Start real Flower processes (SuperLink, SuperNodes) and submit a run: the deployment engine,
not simulation."""

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
from typing import TYPE_CHECKING

from protocol.errors import CommonsError

if TYPE_CHECKING:
    from coordinator.closed import TLS

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
            raise CommonsError(f"{what} exited with code {proc.returncode}: {' '.join(tail)[:300]} (log: "
                               f"{log})")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise CommonsError(f"{what} did not open port {port} within {timeout:.0f}s (log: {log})")


def ensure_free(host: str, port: int) -> None:
    """Refuse a port something already listens on (a coordinator left running would silently serve it)."""
    with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            raise CommonsError(f"port {port} on {host} is in use (another coordinator or index?): stop it or "
                               "pass --port N") from None


@dataclass(frozen=True)
class Runtime:
    """Where a volunteer's SuperNode serves its Runtime API (loopback), and the secret its runner holds."""

    port: int
    secret: Path


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
    address: str = ""  # what volunteers dial: the gate
    control: str = ""  # the SuperLink itself, on loopback: `flwr run` and `flwr supernode register`
    ca: Path | None = None

    def _spawn(self, name: str, args: list[str], env: dict[str, str],
               group: int | None = None) -> tuple[subprocess.Popen, Path]:
        """Each process leads its own group (`close` stops what it started), or joins `group`."""
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        out = log.open("ab")
        group = 0 if group is None else group  # 0: a group of its own (joinable, unlike a new session)
        # cwd: a folder of ours with no code in it (`python -m` puts the cwd first on sys.path)
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=_env(env), cwd=self.workdir,
                                process_group=group)
        self.procs.append(proc)
        return proc, log

    def start_superlink(self, host: str = "127.0.0.1", port: int | None = None,
                        env: dict[str, str] | None = None, extra: list[str] | None = None,
                        tls: TLS | None = None) -> str:
        """The SuperLink on loopback, and the Fleet-only gate (coordinator/gate.py) on HOST:PORT.

        One Flower port serves Fleet, Control (`flwr run`, `flwr supernode register`) and the ServerApp's
        Runtime API: only the coordinator's own machine reaches that port; volunteers reach the gate.
        With `tls` (closed campaigns) both speak TLS and the SuperLink checks SuperNode keys."""
        from coordinator import closed

        port = port or free_port()
        ensure_free(host, port)
        inner = free_port()
        # in-memory state: the SQLite file backend answers "database is locked" under concurrent nodes,
        # and the campaign's own checkpoints are what survives a restart
        security = closed.superlink_args(tls) if tls else ["--insecure"]  # closed: TLS + SuperNode keys
        args = [_bin("flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(inner),
                "--disable-runtime-dependency-installation", *(extra or [])]
        proc, log = self._spawn("superlink", args, env or {})
        wait_port("127.0.0.1", inner, proc, 60, "flower-superlink", log)
        self.control = f"127.0.0.1:{inner}"
        scheme = "https" if tls else "http"
        gate = [sys.executable, "-m", "coordinator.gate", "--host", host, "--port", str(port),
                "--upstream", f"{scheme}://127.0.0.1:{inner}"]
        if tls:
            gate += ["--certfile", str(tls.cert), "--keyfile", str(tls.key), "--ca", str(tls.ca)]
        proc, log = self._spawn("gate", gate, {})
        wait_port(LOCAL.get(host, host).strip("[]"), port, proc, 30, "the coordinator's gate", log)
        # what this machine dials: a certificate never names 0.0.0.0 (Flower's own runtime does the same)
        self.address = f"{LOCAL.get(host, host)}:{port}" if self.ca else f"{host}:{port}"
        return self.address

    def runtime(self, name: str) -> Runtime:
        """A Runtime API port and a fresh secret for one volunteer's SuperNode and runner."""
        folder = self.workdir / "runtime"
        folder.mkdir(parents=True, exist_ok=True)
        secret = folder / f"{name}.secret"
        secret.touch(mode=0o600)
        secret.write_bytes(os.urandom(32))
        return Runtime(port=free_port(), secret=secret)

    def start_runner(self, name: str, runtime: Runtime, home: Path, env: dict[str, str] | None = None,
                     group: int | None = None) -> subprocess.Popen:
        """The volunteer's long-lived ClientApp runner (node/runner.py): installed code only,
        model kept warm."""
        args = [sys.executable, "-m", "node.runner", "--runtime-api-address", f"127.0.0.1:{runtime.port}",
                "--secret-file", str(runtime.secret), "--home", str(home)]
        proc, _ = self._spawn(name, args, env or {}, group=group)
        return proc

    def start_supernode(self, name: str, superlink: str, node_config: dict[str, str | int],
                        env: dict[str, str] | None = None, extra: list[str] | None = None,
                        insecure: bool = True, auth_key: Path | None = None,
                        runtime: Runtime | None = None) -> subprocess.Popen:
        """A SuperNode that runs no app itself (`--isolation process`): its runner answers every message.

        Without `runtime`, a runner is started too, in the SuperNode's process group, so that stopping
        or killing the returned process's group stops both. `commons node start` passes its own
        `runtime` instead, so that its runner (and the model it holds) outlives SuperNode restarts.
        With `ca` on the network: TLS, and `auth_key` (the Flower ECDSA key) signs in to a closed campaign."""
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
        if self.ca:
            from node.flower_keys import supernode_args

            security = supernode_args(self.ca, auth_key)
        else:
            security = ["--insecure"] if insecure else []
        own = runtime or self.runtime(name)
        args = [_bin("flower-supernode"), *security, "--superlink", superlink, "--isolation", "process",
                "--host", "127.0.0.1", "--port", str(own.port), "--superexec-auth-secret-file",
                str(own.secret), "--node-config", cfg, *(extra or [])]
        proc, _ = self._spawn(name, args, env or {})
        if runtime is None:
            home = Path(str(node_config.get("home") or Path.home() / ".commons"))
            self.start_runner(f"{name}-runner", own, home, env, group=proc.pid)
        return proc

    def flwr_home(self) -> Path:
        home = self.workdir / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{self.ca}"' if self.ca else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "commons"\n\n[superlink.commons]\naddress = "{self.control}"\n'
            f'{security}\n'
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
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=self.workdir,
                              check=False, env=_env({"FLWR_HOME": str(self.flwr_home()), **(env or {})}))
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success", False):
            detail = (reply.get("error-message") or (done.stderr or done.stdout).strip().splitlines()[-1:]
                      or ["?"])
            raise CommonsError(f"`flwr run` could not submit the campaign: {str(detail)[:300]}")
        return int(reply["run-id"])

    def close(self) -> None:
        """Stop every process started here and all below them: the SuperLink starts superexec, which
        starts the ServerApp, each in a session of its own that stopping the SuperLink's group misses."""
        from commons.processes import descendants, stop

        below = descendants([proc.pid for proc in self.procs])
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
                _kill_group(proc)
        self.procs.clear()
        stop(below)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process's group, or the process alone when it joined another's (a volunteer's runner)."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        proc.kill()
