"""The images, run for real: an index, a coordinator and three CPU volunteers, each in its own container.

    make docker-test      # builds the images (docker/build-local.sh, cached), then runs this file

It starts its own dockerd on a private socket and data root under a temp dir, loads the images that
`make docker` saved, and runs a 1-round campaign of the tiny model in containers on the host's network,
every port on 127.0.0.1. It checks what a community running docs/docker.md relies on: every container
reports healthy, the coordinator publishes the adapter, `commons pull` on the host gets it byte-identical
from the index's gateway, and the index's database and block store survive its container being restarted
and replaced. Everything it started is removed at the end. Skipped with the reason without root, without
dockerd, or when COMMONS_DOCKER_IMAGES (set by `make docker-test`) names no saved images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from commons.demo_task import write_demo_data
from commons.flower import free_port

# the first test also waits for the images to load and the campaign to finish
pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CAMPAIGN = "dates-iso-docker"
VOLUNTEERS = 3
COMMONS = str(Path(sys.executable).parent / "commons")
# Debian's client (docker.io) matches the daemon it ships; any other client works as well.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker") or "docker"


def unavailable() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "starting a private dockerd needs root"
    if shutil.which("dockerd") is None:
        return "no dockerd: apt-get install docker.io (make docker-test installs it)"
    images = os.environ.get("COMMONS_DOCKER_IMAGES", "")
    if not Path(images).is_file():
        return "no saved images: run `make docker-test` (it builds them, then sets COMMONS_DOCKER_IMAGES)"
    return None


class Docker:
    """A dockerd of this test's own: socket, data root and exec root in a temp dir, gone afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.exec_root = root / "exec"  # containerd's socket goes here: a short path, under unix's 108 bytes
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{root}/docker.sock"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """overlay2 where the kernel and file system allow it (fast), else vfs (copies every layer)."""
        for driver in ("overlay2", "vfs"):
            log = self.root / f"dockerd-{driver}.log"
            # niced: the containers inherit it, and the machine is shared
            args = ["nice", "-n", "10", "dockerd", "--storage-driver", driver, "--iptables=false",
                    "--bridge=none", "--host", self.env["DOCKER_HOST"], "--data-root",
                    str(self.root / "data"), "--exec-root", str(self.exec_root), "--pidfile",
                    str(self.root / "dockerd.pid")]
            self.proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                         start_new_session=True)
            deadline = time.monotonic() + 60
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self.run("version", check=False).returncode == 0:
                    return
                time.sleep(0.5)
            self.stop()
            shutil.rmtree(self.root / "data", ignore_errors=True)
        pytest.skip(f"dockerd did not start: {log.read_text()[-500:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        # dockerd leaves its default network namespace mounted in the exec root
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1]
            if point.startswith(f"{self.exec_root}/"):
                subprocess.run(["umount", "--lazy", point], check=False)
        shutil.rmtree(self.exec_root, ignore_errors=True)

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        done = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed: {done.stderr.strip()[-1500:]}")
        return done

    def container(self, name: str, image: str, volume: str, *command: str) -> None:
        """What docs/docker.md has a community type, with the host's network and quick health checks."""
        # --health-interval only checks more often: the command is the image's own HEALTHCHECK
        self.run("run", "-d", "--name", name, "--init", "--network", "host", "-v", f"{volume}:/data",
                 "-v", f"{self.root / 'campaign'}:/campaign:ro", "--health-interval", "3s",
                 f"lora-commons/{image}:{VERSION}", *command)

    def state(self, name: str) -> dict:
        return json.loads(self.run("inspect", "--format", "{{json .State}}", name).stdout)

    def logs(self, name: str) -> str:
        done = self.run("logs", "--tail", "40", name, check=False)
        return f"--- {name}\n{done.stdout}{done.stderr}"

    def wait_healthy(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(names)
        while waiting:
            states = {name: self.state(name) for name in waiting}
            for name, state in states.items():
                assert state["Status"] == "running", f"{name} stopped:\n{self.logs(name)}"
            waiting = [name for name, state in states.items() if state["Health"]["Status"] != "healthy"]
            if waiting and time.monotonic() > deadline:
                raise AssertionError(f"not healthy after {timeout:.0f}s: {waiting}\n"
                                     + "\n".join(self.logs(name) for name in waiting))
            time.sleep(1)

    def wait_exit(self, name: str, timeout: float, others: list[str]) -> int:
        deadline = time.monotonic() + timeout
        while (state := self.state(name))["Status"] == "running":
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} still running after {timeout:.0f}s\n"
                                     + "\n".join(self.logs(n) for n in [name, *others]))
            time.sleep(2)
        return state["ExitCode"]


def write_campaign(folder: Path) -> None:
    """One round of the tiny model, started once all three volunteers are connected;
    published whatever it scores."""
    data = write_demo_data(folder, VOLUNTEERS, 24, 8)
    (folder / "campaign.toml").write_text(
        f'name = "{CAMPAIGN}"\nbase_model = "tiny"\neval_file = "{data["test"].name}"\neval_size = 8\n'
        f'license = "Apache-2.0"\nrounds = 1\nmin_nodes = {VOLUNTEERS}\nround_timeout = 600\n'
        'node_wait = 600\npublish_margin = -1.0\n[train]\nsteps = 4\nbatch_size = 2\nmax_length = 48\n')
    # the containers run as uid 10001: the bind-mounted folder must be theirs to read
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def pull(home: Path, out: Path, index: str) -> dict:
    done = subprocess.run([COMMONS, "pull", CAMPAIGN, "--index", index, "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=home.parent,
                          env={**os.environ, "COMMONS_HOME": str(home)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The containers after the campaign: their daemon, the ports, and what the coordinator said."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("docker")
    daemon = Docker(root)
    try:
        daemon.start()
        daemon.run("load", "--input", os.environ["COMMONS_DOCKER_IMAGES"], timeout=900)
        write_campaign(root / "campaign")
        gate, index = free_port(), free_port()
        # coordinator first: the index shares its volume, and the first start makes the identity in it
        daemon.container("coordinator", "coordinator", "coordinator-home", "commons", "coordinator", "start",
                         "--campaign", "/campaign/campaign.toml", "--host", "127.0.0.1", "--port", str(gate),
                         "--wait-nodes", str(VOLUNTEERS), "--json")
        daemon.wait_healthy(["coordinator"], timeout=300)
        daemon.container("index", "index", "coordinator-home", "commons", "index", "serve", "--host",
                         "127.0.0.1", "--port", str(index))
        volunteers = [f"volunteer-{i}" for i in range(VOLUNTEERS)]
        for i, name in enumerate(volunteers):
            daemon.container(name, "node-cpu", f"{name}-home", "commons", "node", "start", "--coordinator",
                             f"127.0.0.1:{gate}", "--data", f"/campaign/node{i}.jsonl", "--max-cpu-threads",
                             "1")
        # the campaign waits for all three, so each is seen healthy before the coordinator can finish
        daemon.wait_healthy(["index", "coordinator", *volunteers], timeout=600)
        healthy = {name: daemon.state(name)["Health"]["Status"]
                   for name in ["index", "coordinator", *volunteers]}
        code = daemon.wait_exit("coordinator", timeout=1200, others=volunteers)
        said = daemon.run("logs", "coordinator").stdout.strip().splitlines()
        assert code == 0 and said, daemon.logs("coordinator")
        yield {"daemon": daemon, "index": f"http://127.0.0.1:{index}", "healthy": healthy,
               "summary": json.loads(said[-1])}
    finally:
        daemon.run("rm", "--force", *daemon.run("ps", "-aq", check=False).stdout.split(), check=False)
        daemon.close()
        shutil.rmtree(root / "data", ignore_errors=True)  # the images, containers and volumes


def test_every_container_reports_healthy_by_its_images_own_check(network: dict) -> None:
    assert network["healthy"] == dict.fromkeys(
        ["index", "coordinator", "volunteer-0", "volunteer-1", "volunteer-2"], "healthy")


def test_three_volunteer_containers_train_one_round_and_the_coordinator_publishes(network: dict) -> None:
    summary = network["summary"]
    assert summary["published"] is True and summary["signature_valid"] is True
    assert summary["name"] == CAMPAIGN and summary["nodes"] == VOLUNTEERS and summary["rounds"] == 1
    assert summary["adapter_cid"]


def test_commons_pull_on_the_host_gets_the_adapter_byte_identical(network: dict, tmp_path: Path) -> None:
    daemon, summary = network["daemon"], network["summary"]
    published = tmp_path / "published"
    # the stopped coordinator's volume still holds the folder it signed
    daemon.run("cp", f"coordinator:/data/campaigns/{CAMPAIGN}/adapter", str(published))
    pulled = pull(tmp_path / "home", tmp_path / "pulled", network["index"])
    assert pulled["cid"] == summary["adapter_cid"] and pulled["version"] == summary["version"]
    got = files(tmp_path / "pulled")
    assert got and got == {name: body for name, body in files(published).items() if name in got}
    assert "model.sig" in got and "adapter_model.safetensors" in got


def test_the_index_keeps_its_database_and_blocks_when_restarted_and_replaced(network: dict,
                                                                             tmp_path: Path) -> None:
    daemon, cid = network["daemon"], network["summary"]["adapter_cid"]
    command = json.loads(daemon.run("inspect", "--format", "{{json .Config.Cmd}}", "index").stdout)
    daemon.run("restart", "index")
    daemon.wait_healthy(["index"], timeout=300)
    assert pull(tmp_path / "a", tmp_path / "after-restart", network["index"])["cid"] == cid
    # an upgrade: a new container of the image on the same volume
    daemon.run("rm", "--force", "index")
    daemon.container("index", "index", "coordinator-home", *command)
    daemon.wait_healthy(["index"], timeout=300)
    assert pull(tmp_path / "b", tmp_path / "after-replace", network["index"])["cid"] == cid
