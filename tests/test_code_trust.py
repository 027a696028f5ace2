"""A volunteer runs only the code they installed; only the coordinator's admin runs campaigns.

Each attack runs with real processes: a malicious coordinator's own ClientApp, a bundle that ships a
shadowing `node/client_app.py`, the same in a closed campaign, and a stranger's `flwr run` against a
coordinator started by `commons coordinator start`. (A stranger registering a SuperNode key in a
closed campaign: tests/test_closed_cli.py.) Each asserts that no marker file appears and that the
legitimate campaign still completes.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from test_federation_e2e import read_events, wait_for, write_campaign

from commons.flower import Network, _bin, _env, free_port
from coordinator import closed
from coordinator.gate import allowed
from node.flower_keys import supernode_key
from node.runner import APP, read_bundle, refusal

COMMONS = str(Path(sys.executable).parent / "commons")

EVIL_CLIENT = """
import json
import sys
from flwr.clientapp import ClientApp

with open({marker!r}, "a") as marker:  # which process imported it
    marker.write(json.dumps(sys.argv) + "\\n")
app = ClientApp()


@app.query()
def query(msg, context):
    with open({marker!r}, "a") as marker:
        marker.write(json.dumps(["ran", *sys.argv]) + "\\n")
"""

EVIL_SERVER = """
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

Path({marker!r}).with_suffix(".server").write_text("imported")  # harmless where the attacker runs it
app = ServerApp()


@app.main()
def main(grid, context):
    deadline = time.time() + 60
    nodes = []
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    out = [Message(RecordDict({{"config": ConfigRecord({{"want": "info"}})}}), dst_node_id=n,
                   message_type="query")
           for n in nodes]
    replies = list(grid.send_and_receive(out, timeout=90))
    said = [r.error.reason if r.has_error() else sorted(r.content["info"].keys()) for r in replies]
    Path({report!r}).write_text(json.dumps(said))
"""


def evil_app(folder: Path, marker: Path, report: Path, shadow: bool) -> Path:
    """A coordinator's own app: its ClientApp is its module, or (shadow) ours by name with its own copy."""
    folder.mkdir(parents=True)
    clientapp = APP if shadow else "evil_client:app"
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "lora-commons"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "evil_server:app"\nclientapp = "{clientapp}"\n'
    )
    code = EVIL_CLIENT.format(marker=str(marker))
    if shadow:
        (folder / "node").mkdir()
        (folder / "node" / "__init__.py").write_text(code)
        (folder / "node" / "client_app.py").write_text(code)
    else:
        (folder / "evil_client.py").write_text(code)
    (folder / "evil_server.py").write_text(EVIL_SERVER.format(marker=str(marker), report=str(report)))
    return folder


def ran_outside_the_attackers_cli(marker: Path) -> list[list[str]]:
    """Processes that imported the attacker's module, but for the attacker's own `flwr run` (which
    validates the app it builds, on the attacker's machine: no harm to anyone else)."""
    lines = [json.loads(x) for x in marker.read_text().splitlines()] if marker.exists() else []
    return [argv for argv in lines if not (argv[0].endswith("flwr") and argv[1:2] == ["run"])]


def flwr_run(app: Path, flwr_home: Path, cwd: Path) -> dict:
    done = subprocess.run([_bin("flwr"), "run", str(app), "commons", "--format", "json"], capture_output=True,
                          text=True, timeout=120, cwd=cwd, check=False,
                          env=_env({"FLWR_HOME": str(flwr_home)}))
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"success": False, "stderr": done.stderr[-500:]}


def fab(pyproject: str, extra: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("pyproject.toml", pyproject)
        for name, text in (extra or {}).items():
            archive.writestr(name, text)
    return out.getvalue()


OURS = ('[tool.flwr.app.components]\nserverapp = "coordinator.server_app:app"\n'
        'clientapp = "node.client_app:app"\n')


def test_a_bundle_declaring_another_clientapp_is_refused_in_one_line() -> None:
    why = refusal(fab(OURS.replace("node.client_app:app", "evil_client:app"),
                      {"evil_client.py": "import os"}))
    assert why is not None and "\n" not in why
    assert ("declares ClientApp 'evil_client:app'" in why
            and "only lora-commons' installed node.client_app:app" in why)


def test_a_bundle_naming_our_app_passes_but_its_own_copy_is_only_listed_never_loaded() -> None:
    blob = fab(OURS, {"node/client_app.py": "raise SystemExit('shadow')"})
    assert refusal(blob) is None
    assert read_bundle(blob).code_files == ("node/client_app.py",)


def test_what_is_not_a_flower_bundle_is_refused() -> None:
    assert "not a Flower app bundle" in refusal(b"PK\x03\x04 garbage")
    assert "not a Flower app bundle" in refusal(fab("[tool", {}))
    assert "bytes" in refusal(fab("# " + "x" * 70_000 + "\n" + OURS))


def test_the_gate_forwards_only_the_fleet_api() -> None:
    assert allowed("POST", "/v1/fleet/pull-messages") and allowed("POST", "/v1/fleet/push-object")
    for method, path in [("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"),
                         ("POST", "/v1/runtime/acquire-task"), ("GET", "/v1/fleet/pull-messages"),
                         ("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/")]:
        assert not allowed(method, path), path


def test_flower_internals_the_runner_relies_on_are_as_built_against() -> None:
    """node/runner.py speaks Flower's process-isolation protocol with Flower's own helpers: a Flower
    upgrade that changes them must fail here, loudly, before a volunteer's node does."""
    import flwr
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: F401
    from flwr.supercore.constant import TaskType
    from flwr.supernode.runtime import run_clientapp

    assert flwr.__version__.startswith("1.42."), (
        f"node/runner.py is built against Flower 1.42, not {flwr.__version__}")
    assert list(inspect.signature(run_clientapp.pull_task_input).parameters) == ["client"]
    assert list(inspect.signature(run_clientapp.push_message).parameters) == ["client", "message", "context"]
    assert list(inspect.signature(run_clientapp.push_task_output).parameters) == ["client", "context",
                                                                                  "sub_status", "details"]
    assert TaskType.CLIENT_APP == "flwr-clientapp"
    assert SubStatus.COMPLETED and ErrorCode.LOAD_CLIENT_APP_EXCEPTION


def daemon(home: Path, address: str, data: Path, *extra: str) -> subprocess.Popen:
    """`commons node start`, exactly as docs/federation.md tells a volunteer to run it."""
    home.mkdir(parents=True, exist_ok=True)
    out = (home / "daemon.log").open("ab")
    return subprocess.Popen([COMMONS, "node", "start", "--coordinator", address, "--data", str(data),
                             "--max-cpu-threads", "1", *extra], stdout=out, stderr=out,
                            env={**os.environ, "COMMONS_HOME": str(home)})


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=30)


def wait_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.3)
    raise AssertionError(f"no {path} within {timeout}s")


@pytest.mark.slow  # about 90 s each on a loaded 2-core machine
@pytest.mark.parametrize("closed_campaign", [False, True], ids=["open", "closed"])
def test_a_malicious_coordinators_code_never_runs_on_a_volunteer(tmp_path: Path,
                                                                 closed_campaign: bool) -> None:
    campaign, data = write_campaign(tmp_path, 1, rounds=1, round_timeout=120)
    campaign.write_text(campaign.read_text().replace("min_nodes = 2", "min_nodes = 1"))
    marker = tmp_path / "pwned"
    tls = closed.make_tls(tmp_path / "tls") if closed_campaign else None
    net = Network(tmp_path / "coordinator", ca=tls.ca if tls else None)
    volunteer = tmp_path / "volunteer"
    procs = []
    try:
        net.start_superlink(env={"COMMONS_HOME": str(tmp_path / "coord")}, tls=tls)
        extra: tuple[str, ...] = ()
        if tls:
            key = supernode_key(volunteer)[1]  # what `commons node key` makes, admitted by this admin
            closed.register(_bin("flwr"), net.flwr_home(), key, _env({}))
            extra = ("--ca", str(tls.ca))
        procs.append(daemon(volunteer, net.address, data[0], *extra))
        for shadow in (False, True):
            report = tmp_path / f"report-{shadow}.json"
            app = evil_app(tmp_path / f"evil-{shadow}", marker, report, shadow)
            assert flwr_run(app, net.flwr_home(), tmp_path).get("success"), (
                "the coordinator's admin may submit")
            said = json.loads(wait_file(report, 150))
            assert len(said) == 1
            if shadow:  # our installed app answered the query; the bundle's copy was never imported
                assert said[0] == ["capability", "examples", "peer_id", "public_key"]
            else:
                assert "refused the coordinator's app: it declares ClientApp 'evil_client:app'" in said[0]
                status = json.loads((volunteer / "status.json").read_text())
                assert status["state"] == "refused" and "evil_client:app" in status["reason"]
        # the same volunteer, still running, then takes part in a legitimate campaign
        net.submit({"campaign": str(campaign), "home": str(tmp_path / "coord")})
        log = wait_for(tmp_path, lambda log: any(e["event"] == "campaign_end" for e in log), 180)
        assert any(e["event"] == "published" for e in log)
    finally:
        net.close()
        stop(procs)
    assert ran_outside_the_attackers_cli(marker) == []
    assert procs[0].returncode == 0


@pytest.mark.slow  # about 60 s on a loaded 2-core machine
def test_a_strangers_flwr_run_against_a_coordinator_is_refused(tmp_path: Path) -> None:
    campaign, data = write_campaign(tmp_path, 1, rounds=1, round_timeout=120)
    campaign.write_text("publish_margin = -1.0\n"
                        + campaign.read_text().replace("min_nodes = 2", "min_nodes = 1"))
    marker, report = tmp_path / "pwned", tmp_path / "report.json"
    port = free_port()
    coord = tmp_path / "coord"
    coord.mkdir()
    out = (tmp_path / "coord.log").open("w")
    procs = [subprocess.Popen([COMMONS, "coordinator", "start", "--campaign", str(campaign), "--host",
                               "127.0.0.1", "--port", str(port), "--wait-nodes", "1", "--json"], stdout=out,
                              stderr=out, env={**os.environ, "COMMONS_HOME": str(coord)})]
    try:
        procs.append(daemon(tmp_path / "volunteer", f"127.0.0.1:{port}", data[0]))
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        (stranger / "config.toml").write_text(
            f'[superlink]\ndefault = "commons"\n\n[superlink.commons]\naddress = "127.0.0.1:{port}"\n'
            'insecure = true\n')
        wait_file(coord / "coordinator" / "running.json", 60)  # its SuperLink and gate are up
        reply = flwr_run(evil_app(tmp_path / "evil", marker, report, shadow=False), stranger, tmp_path)
        assert not reply.get("success"), reply
        assert procs[0].wait(timeout=240) == 0, (tmp_path / "coord.log").read_text()[-2000:]
    finally:
        stop(procs)
    assert ran_outside_the_attackers_cli(marker) == []
    assert not marker.with_suffix(".server").exists() and not report.exists()
    events = [e["event"] for e in read_events(tmp_path)]
    assert "published" in events and events[-1] == "campaign_end"
