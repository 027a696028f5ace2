"""A QLoRA campaign as a coordinator runs it: `quantization = "nf4"` with real Flower processes (coordinator,
SuperLink, two volunteers' SuperNodes and warm runners), the tiny model so it fits the suite."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_closed_cli import spawn, wait_text
from test_coordinator_cli import capitals

from commons.flower import free_port
from modeling.load import TINY_ID, load_base, local_path
from protocol.signing.manifest import verify_directory


@pytest.mark.slow  # 1-2 minutes on a loaded 2-core machine
def test_an_nf4_campaign_with_real_volunteers_publishes_a_plain_peft_adapter(tmp_path: Path) -> None:
    from peft import PeftModel

    local_path(TINY_ID)
    campaign = capitals(tmp_path, 'license = "CC-BY-4.0"\nrounds = 2\nmin_nodes = 2\nround_timeout = 180\n'
                                  'node_wait = 180\npublish_margin = -1.0\nquantization = "nf4"\n[train]\n'
                                  "steps = 6\nbatch_size = 2\nmax_length = 48\n")
    data = sorted((tmp_path / "data").glob("node*.jsonl"))
    port, procs = free_port(), {}
    coord = tmp_path / "coord"
    try:
        procs["coord"] = spawn(coord, tmp_path / "coord.log", "coordinator", "start", "--campaign",
                               str(campaign), "--host", "127.0.0.1", "--port", str(port))
        wait_text(tmp_path / "coord.log", "rounds start once 2 volunteers can train", procs["coord"], 120)
        for name, file in zip(("alice", "bob"), data, strict=True):
            procs[name] = spawn(tmp_path / name, tmp_path / f"{name}.log", "node", "start", "--coordinator",
                                f"127.0.0.1:{port}", "--max-cpu-threads", "1", "--data", str(file))
        assert procs["coord"].wait(timeout=480) == 0, (tmp_path / "coord.log").read_text()[-3000:]
        ended = "campaign capitals ended: published capitals v1"
        said = wait_text(tmp_path / "alice.log", ended, procs["alice"], 60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            proc.wait(timeout=60)
    result = json.loads((coord / "campaigns" / "capitals" / "result.json").read_text())
    assert result["published"], result
    meta = verify_directory(Path(result["adapter_dir"])).meta
    assert [entry["trained_as"] for entry in meta.ledger] == [["nf4/float32"]] * 2
    assert meta.eval["base_precision"] == "float32"
    # plain PEFT on the unquantized base
    PeftModel.from_pretrained(load_base("tiny")[0], result["adapter_dir"])
    assert "waiting for the next campaign" in said


def test_loading_an_nf4_base_says_nothing_about_remote_kernels_it_never_runs() -> None:
    load = "from modeling.load import load_base; load_base('tiny', quantization='nf4')"
    done = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300,
                          check=True)
    assert "kernels-community" not in done.stderr
