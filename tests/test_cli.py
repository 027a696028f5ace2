"""The CLI contract: init, publish (versions chain), config errors; each failure is one line, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from commons.cli import cli
from protocol.content.blockstore import BlockStore

COMMONS = str(Path(sys.executable).parent / "commons")


def run(*args: str) -> tuple[int, str, str]:
    """The installed console script, exactly as users run it."""
    done = subprocess.run([COMMONS, *args], capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, done.stdout, done.stderr


def adapter_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "commons/tiny-random-llama", "r": 4, "lora_alpha": 8,
         "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return folder


def test_init_creates_identity_and_config_once(isolated_home: Path) -> None:
    code, out, _ = run("init", "--json")
    first = json.loads(out)
    assert code == 0 and first["created_identity"] and first["created_config"]
    assert (isolated_home / "config.toml").exists() and first["peer_id"].startswith("12D3KooW")
    code, out, _ = run("init", "--json")
    again = json.loads(out)
    assert not again["created_identity"] and again["public_key"] == first["public_key"]


def test_publish_chains_versions_and_stores_every_block(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path)
    code, out, err = run("publish", str(folder), "--name", "my-adapter", "--license", "MIT", "--json")
    assert code == 0, err
    first = json.loads(out)
    assert first["version"] == 1 and BlockStore().missing(first["cid"]) == []
    (folder / "README.md").write_text("v2\n")
    code, out, err = run("publish", str(folder), "--name", "my-adapter", "--license", "MIT", "--json")
    second = json.loads(out)
    assert code == 0 and second["version"] == 2 and second["cid"] != first["cid"]
    from index.db import IndexDB

    entry = IndexDB().resolve("my-adapter")
    assert entry["version"] == 2 and entry["cid"] == second["cid"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["publish", "/nonexistent/adapter", "--name", "x", "--license", "MIT"], "no such folder"),
        (["pull", "not a name!"], "neither a CID nor NAME"),
        (["demo", "--nodes", "0"], "0"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args: list[str], fragment: str) -> None:
    code, out, err = run(*args)
    assert code != 0 and fragment in (out + err) and "Traceback" not in (out + err)


def test_a_broken_config_names_the_file_and_the_fix(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text("index_url = [\n")
    code, _, err = run("pull", "some-adapter")
    assert code == 1 and "config.toml is not valid TOML" in err and "commons init" in err


def test_publish_without_adapter_config_is_refused(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path)
    (folder / "adapter_config.json").unlink()
    code, _, err = run("publish", str(folder), "--name", "x", "--license", "MIT")
    assert code == 1 and "adapter_config.json" in err
    shutil.rmtree(folder)


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for name, command in cli.commands.items():
        assert runner.invoke(cli, [name, "--help"]).exit_code == 0, name
        for sub in getattr(command, "commands", {}):
            assert runner.invoke(cli, [name, sub, "--help"]).exit_code == 0, f"{name} {sub}"


def test_node_status_line_says_what_the_volunteer_sees() -> None:
    from commons.cli.node import status_text

    failing = ("INFO : Starting\n\x1b[93mWARNING \x1b[0m:   Connection attempt failed, "
               "retrying in 0.70 seconds\n")
    assert status_text(None, failing, "10.0.0.5:9092", closed=False) == (
        "cannot reach the coordinator 10.0.0.5:9092, retrying; if it runs a closed campaign, "
        "pass --ca ca.pem")
    assert status_text(None, failing, "10.0.0.5:9092", closed=True) == (
        "cannot reach the coordinator 10.0.0.5:9092, retrying")
    assert status_text(None, "INFO : connected\n", "h:1", closed=False) == "waiting for work"
    training = {"state": "training", "round": 2, "step": 3, "steps": 10, "loss": 1.23456,
                "tokens_per_s": 190.4}
    assert status_text(training, "", "h:1", False) == "round 2 step 3/10 loss 1.235 190 tokens/s"
    paused = {"state": "paused", "round": 2, "reason": "on battery"}
    assert status_text(paused, "", "h:1", False) == "round 2 paused: on battery (--idle-only)"
    assert status_text({"state": "sent", "round": 3, "loss": None}, "", "h:1", False) == (
        "round 3 sent; waiting for the next round")  # never "loss None"
    joined = {"state": "sent", "round": 1, "loss": 2.5, "joined_s": 41.7}
    assert status_text(joined, "", "h:1", False) == (
        "round 1 sent, loss 2.500; waiting for the next round (joined: first update 42 s after start)")
    ended = {"state": "ended", "campaign": "capitals", "outcome": "published capitals v2 (QmX…)"}
    assert status_text(ended, "", "h:1", False) == (
        "campaign capitals ended: published capitals v2 (QmX…); waiting for the next campaign")
    refused = {"state": "refused",
               "reason": "refused the coordinator's app: it declares ClientApp 'x:app', …"}
    assert status_text(refused, "", "h:1", False) == refused["reason"]
    failed = {"state": "failed", "round": 2, "reason": "CommonsError: train.jsonl:3: not JSON"}
    assert status_text(failed, "", "h:1", False) == "round 2 failed: CommonsError: train.jsonl:3: not JSON"


def test_node_start_refuses_a_url_a_bad_address_and_a_bad_data_line_in_one_line(tmp_path: Path) -> None:
    code, _, err = run("node", "start", "--coordinator", "http://coord.example.org:9092/")
    assert code == 1 and err.strip() == ("error: --coordinator takes HOST:PORT without a scheme: use "
                                         "--coordinator coord.example.org:9092")
    code, _, err = run("node", "start", "--coordinator", "coord.example.org")
    assert code == 1 and "needs HOST:PORT, e.g. 192.0.2.10:9092" in err and len(err.strip().splitlines()) == 1
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '
                    '"ho"}]}\n{"messages": [{"role": "user", "content": "no answer"\n')
    code, _, err = run("node", "start", "--coordinator", "127.0.0.1:9", "--data", str(data))
    assert (code == 1 and err.strip().startswith(f"error: {data}:2: not JSON")
            and len(err.strip().splitlines()) == 1)


def test_node_start_says_it_waits_for_an_absent_coordinator_and_stops_on_sigterm(tmp_path: Path) -> None:
    import os
    import signal
    import time

    from commons.flower import free_port

    port = free_port()  # nothing listens there
    proc = subprocess.Popen([COMMONS, "node", "start", "--coordinator", f"127.0.0.1:{port}"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert f"waiting for the coordinator at 127.0.0.1:{port}" in err and "connected to" not in err
    assert err.strip().splitlines()[-1] == ("volunteer stopped; `commons node start --coordinator "
                                            f"127.0.0.1:{port}` joins again")


def test_a_sigterm_to_every_process_of_a_volunteer_is_a_stop_not_a_lost_coordinator(tmp_path: Path) -> None:
    import os
    import signal
    import time

    from commons.flower import free_port
    from commons.processes import descendants

    port = free_port()
    proc = subprocess.Popen([COMMONS, "node", "start", "--coordinator", f"127.0.0.1:{port}"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    supernode = None
    for _ in range(100):
        time.sleep(0.3)
        supernode = next((pid for pid in descendants([proc.pid])
                          if b"flower-supernode" in Path(f"/proc/{pid}/cmdline").read_bytes()), None)
        if supernode:
            break
    assert supernode, "no SuperNode started"
    time.sleep(3)
    os.kill(supernode, signal.SIGTERM)  # systemd's stop signals every process of the unit: the child first
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "lost the coordinator" not in err, err
    assert err.strip().splitlines()[-1].startswith("volunteer stopped; ")
