"""`commons coordinator start`, `commons index serve` and `commons base path` as a new coordinator types them:
real processes, each party with its own COMMONS_HOME, a campaign of the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_closed_cli import spawn, wait_text

from commons.demo_task import write_demo_data
from commons.flower import ensure_free, free_port
from modeling.load import TINY_ID, local_path, weights_sha256

COMMONS = str(Path(sys.executable).parent / "commons")


def commons(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([COMMONS, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=home.parent, env={**os.environ, "COMMONS_HOME": str(home)})


def capitals(tmp_path: Path, text: str) -> Path:
    """The user's own campaign file, next to its eval file."""
    data = write_demo_data(tmp_path / "data", 2, 12, 4)
    path = tmp_path / "capitals.toml"
    path.write_text(f'name = "capitals"\nbase_model = "tiny"\neval_file = "{data["test"]}"\neval_size = 4\n'
                    f'{text}')
    return path


def processes_of(home: Path) -> list[int]:
    """Processes still running with this COMMONS_HOME: what `coordinator start` started, however deep."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"COMMONS_HOME={home}".encode() in environ.read_bytes().split(b"\0"):
                stat = (environ.parent / "stat").read_text()
                if stat[stat.rindex(")") + 2] != "Z":
                    found.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue
    return found


def test_a_mistyped_campaign_key_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    done = commons(tmp_path / "coord", "coordinator", "start", "--campaign",
                   str(capitals(tmp_path, 'min_nodes = "two"\n')))
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        'error: min_nodes = "two" in the campaign file must be a whole number, e.g. min_nodes = 1']
    assert "Port volunteers dial" in commons(tmp_path / "coord", "coordinator", "start", "--help").stdout


def test_index_serve_refuses_a_port_in_use_naming_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = commons(tmp_path / "home", "index", "serve", "--port", str(port))
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        (f"error: port {port} on 127.0.0.1 is in use (another coordinator or index?): "
         "stop it or pass --port N")]


def test_base_path_prints_the_folder_plain_peft_loads_offline(tmp_path: Path) -> None:
    done = commons(tmp_path / "home", "base", "path", "tiny", "--json")
    said = json.loads(done.stdout)
    folder = Path(said["path"])
    assert done.returncode == 0 and folder == local_path(TINY_ID) and (folder / "config.json").is_file()
    assert said["revision"] == f"sha256:{weights_sha256(folder)}"


@pytest.mark.slow  # 40-100 s on a loaded 2-core machine: two coordinator starts
def test_a_failed_campaign_starts_again_and_sigterm_stops_every_process(tmp_path: Path) -> None:
    local_path(TINY_ID)
    home, port = tmp_path / "coord", free_port()
    campaign = capitals(tmp_path, "node_wait = 2\n")
    first = commons(home, "coordinator", "start", "--campaign", str(campaign), "--port", str(port))
    failed = "round 1: only 0 of min_nodes=1 volunteers could train after waiting 2s (0 connected)"
    assert first.returncode == 1 and first.stderr.strip().splitlines()[-1].startswith(
        f"error: the campaign failed: {failed}")
    # the user runs the same command again, patience raised: it starts (the old error is not read back)
    campaign.write_text(campaign.read_text().replace("node_wait = 2", "node_wait = 300"))
    second = spawn(home, tmp_path / "second.log", "coordinator", "start", "--campaign", str(campaign),
                   "--port", str(port))
    said = wait_text(tmp_path / "second.log", "waiting for volunteers: 0 of 1 ready", second, 120)
    started = time.monotonic()
    second.send_signal(signal.SIGTERM)  # what `kill`, `timeout` and systemd send
    assert second.wait(timeout=60) == 130
    stopping = time.monotonic() - started
    lines = said.splitlines()
    assert lines[0] == (f"campaign capitals starts again from round 1 (it stopped: {failed}: start more "
                        "nodes, raise node_wait or lower min_nodes in the campaign file)")
    assert lines[1].startswith("warning: the campaign file names no license: the adapter will be published "
                               "under Apache-2.0; add license = ")
    assert f":{port}`" in lines[2] and "HOST" not in said  # a real address to dial, not a placeholder
    ensure_free("0.0.0.0", port)  # the port is free again
    deadline = time.monotonic() + 10  # a killed child may take a moment to be gone from /proc
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(home) == [] and stopping < 30


@pytest.mark.slow  # 1½-3 minutes on a loaded 2-core machine
def test_a_volunteer_pressing_ctrl_c_rejoins_and_the_coordinator_says_what_happens(tmp_path: Path) -> None:
    local_path(TINY_ID)
    campaign = capitals(tmp_path, 'license = "CC-BY-4.0"\nrounds = 2\nmin_nodes = 2\nround_timeout = 180\n'
                                  "node_wait = 180\npublish_margin = -1.0\n[train]\nsteps = 10\n"
                                  "batch_size = 2\nmax_length = 48\n")
    data = sorted((tmp_path / "data").glob("node*.jsonl"))
    port, procs = free_port(), {}
    coord = tmp_path / "coord"
    node = ["node", "start", "--coordinator", f"127.0.0.1:{port}", "--max-cpu-threads", "1", "--data"]
    events = coord / "campaigns" / "capitals" / "events.jsonl"
    try:
        procs["coord"] = spawn(coord, tmp_path / "coord.log", "coordinator", "start", "--campaign",
                               str(campaign), "--host", "127.0.0.1", "--port", str(port))
        wait_text(tmp_path / "coord.log", "rounds start once 2 volunteers can train", procs["coord"], 120)
        for name, file in zip(("alice", "bob"), data, strict=True):
            procs[name] = spawn(tmp_path / name, tmp_path / f"{name}.log", *node, str(file))
        wait_text(events, '"event": "plan"', procs["coord"], 240)
        procs["alice"].send_signal(signal.SIGINT)  # Ctrl-C in the middle of round 1
        procs["alice"].wait(timeout=60)
        procs["alice"] = spawn(tmp_path / "alice", tmp_path / "alice2.log", *node, str(data[0]))
        assert procs["coord"].wait(timeout=420) == 0, (tmp_path / "coord.log").read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            proc.wait(timeout=60)
    said = (tmp_path / "coord.log").read_text()
    out = (tmp_path / "coord.out").read_text().splitlines()
    log = [json.loads(line) for line in events.read_text().splitlines()]
    assert "round 1: 2 volunteers training: " in said and "rejoined; its work is sent again" in said
    assert "round 2: loss " in said and "held-out accuracy" in said
    assert [e["round"] for e in log if e["event"] == "rejoined"] == [1]
    assert [e["accepted"] for e in log if e["event"] == "round_end"] == [2, 2]
    assert out[1].startswith("published capitals v1 Qm") and "licence CC-BY-4.0" in out[0]
    assert (out[3].startswith("pull it:  commons pull capitals --index http://")
            and "HOST" not in said + "".join(out))


@pytest.mark.slow  # 20-60 s on a loaded 2-core machine
def test_sigterm_stops_a_demo_and_every_process_it_started(tmp_path: Path) -> None:
    local_path(TINY_ID)
    home = tmp_path / "home"
    demo = spawn(home, tmp_path / "demo.log", "demo", "--base-model", "tiny", "--nodes", "2",
                 "--rounds", "50")
    deadline = time.monotonic() + 180
    while not list(home.glob("**/events.jsonl")) and time.monotonic() < deadline:
        assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-2000:]
        time.sleep(0.5)
    assert processes_of(home)  # SuperLink, SuperNodes, runners, the ServerApp
    demo.send_signal(signal.SIGTERM)
    demo.wait(timeout=60)
    deadline = time.monotonic() + 10
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(home) == []
