"""The whole path with real processes: Flower SuperLink + SuperNodes, signing, index, pull, PEFT load.

Uses the tiny random-init model so it runs in about a minute; tests/test_smollm2.py does it for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.content.blockstore import BlockStore

COMMONS = str(Path(sys.executable).parent / "commons")


def commons(*args: str, home: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMMONS_HOME": str(home)}
    done = subprocess.run([COMMONS, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"commons {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    home = tmp_path_factory.mktemp("coordinator-home")
    done = commons("demo", "--base-model", "tiny", "--nodes", "2", "--rounds", "2", "--steps", "2", "--json",
                   home=home)
    return home, json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def serve_index(home: Path, port: int):
    """`commons index serve` over `home`, as a separate process, until the block ends."""
    proc = subprocess.Popen([COMMONS, "index", "serve", "--port", str(port)],
                            env={**os.environ, "COMMONS_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def index_url(demo: tuple[Path, dict]):
    with serve_index(demo[0], free_port()) as url:
        yield url


def test_demo_runs_the_deployment_engine_and_publishes_a_signed_adapter(demo: tuple[Path, dict]) -> None:
    home, summary = demo
    assert summary["engine"] == "deployment" and summary["nodes"] == 2 and summary["rounds"] == 2
    assert summary["signature_valid"] is True and summary["adapter_cid"].startswith("Qm")
    assert set(summary) >= {"adapter_cid", "name", "engine", "nodes", "rounds", "accuracy_base",
                            "accuracy_adapter", "signature_valid", "index_url"}
    adapter = home / "campaigns" / summary["name"] / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                   "README.md", "model.sig"}
    # the CID is the one Kubo's `ipfs add -r` gives for the folder, and the store holds every block
    assert commons("cid", str(adapter), home=home).stdout.strip() == summary["adapter_cid"]
    assert BlockStore(home / "blocks").missing(summary["adapter_cid"]) == []
    assert commons("verify", summary["adapter_cid"], home=home).returncode == 0


def test_the_demo_runs_what_a_campaign_file_without_those_keys_gets(demo: tuple[Path, dict]) -> None:
    """The demo shows the campaign defaults, not a friendlier setting of its own; only --quantization
    (default auto) and the task's own keys are written."""
    import tomllib

    from coordinator.campaign import Campaign

    home, _ = demo
    written = tomllib.loads((home / "demo" / "campaign.toml").read_text())
    defaults = Campaign(name="x", base_model="x", eval_file=Path("x"))
    for key in ("aggregation", "shards", "min_coverage", "upload_dtype", "quantization", "quorum"):
        assert written[key] == getattr(defaults, key), key
    assert written.get("outer", {}).get("optimizer", "none") == defaults.outer.optimizer
    refused = commons("demo", "--quantization", "fp8", home=home, check=False)
    assert refused.returncode == 2 and "'fp8' is not one of" in refused.stderr


def test_both_volunteers_contributed_and_signed_their_updates(demo: tuple[Path, dict]) -> None:
    home, summary = demo
    result = json.loads((home / "campaigns" / summary["name"] / "result.json").read_text())
    assert len(result["contributors"]) == 2 and all(e["rounds"] == 2 and e["tokens"] > 0
                                                    for e in result["ledger"])
    events = [json.loads(line)["event"]
              for line in (home / "campaigns" / summary["name"] / "events.jsonl").open()]
    assert events.count("update") == 4 and "update_dropped" not in events


def test_pull_into_a_fresh_home_gives_a_folder_peft_loads(demo: tuple[Path, dict], index_url: str,
                                                          tmp_path: Path) -> None:
    _, summary = demo
    fresh = tmp_path / "developer"
    done = commons("pull", summary["name"], "--index", index_url, "--json", home=fresh)
    pulled = json.loads(done.stdout)
    assert pulled["cid"] == summary["adapter_cid"]
    from peft import PeftModel

    from modeling.load import load_base

    base, _ = load_base("tiny")
    model = PeftModel.from_pretrained(base, pulled["path"])
    lora = [n for n, _ in model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_pull_prints_the_python_that_loads_it(demo: tuple[Path, dict], index_url: str,
                                              tmp_path: Path) -> None:
    _, summary = demo
    done = commons("pull", f"{summary['name']}@1", "--index", index_url, home=tmp_path / "dev")
    assert "verified" in done.stdout and "load_adapter(" in done.stdout


def test_pull_refuses_a_block_that_does_not_match_its_cid(demo: tuple[Path, dict], index_url: str,
                                                          tmp_path: Path) -> None:
    home, summary = demo
    store = BlockStore(home / "blocks")
    victim = next(cid for cid, block in store.dag(summary["adapter_cid"]) if len(block) > 1000)
    path = next(p for p in (home / "blocks").rglob("*")
                if p.is_file() and p.read_bytes() == store.get(victim))
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        done = commons("pull", summary["adapter_cid"], "--index", index_url, home=tmp_path / "dev2",
                       check=False)
    finally:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(original)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "not available" in done.stderr
    assert (not (tmp_path / "dev2" / "adapters").exists()
            or not any((tmp_path / "dev2" / "adapters").iterdir()))


def test_unknown_names_and_a_missing_index_are_one_line_errors(index_url: str, tmp_path: Path) -> None:
    done = commons("pull", "no-such-adapter", "--index", index_url, home=tmp_path, check=False)
    assert (done.returncode == 1 and "no adapter or dataset named" in done.stderr
            and done.stderr.count("\n") == 1)
    done = commons("pull", "x", "--index", f"http://127.0.0.1:{free_port()}", home=tmp_path, check=False)
    assert done.returncode == 1 and "commons index serve" in done.stderr
