"""The real thing: SmolLM2-135M-Instruct, federated LoRA across real Flower processes, then a developer's
pull into a fresh home and `PeftModel.from_pretrained` that answers the held-out dates in ISO format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_demo_e2e import commons, free_port, serve_index

from commons.demo_task import STYLES, make_records
from coordinator.evaluate import exact_match, generate, normalize

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    home = tmp_path_factory.mktemp("smollm2-home")
    # one round: on this task round 1 already reaches what round 2 does (79 % both, measured), and each
    # round costs ~100 s of the suite on 2 cores
    done = commons("demo", "--nodes", "2", "--rounds", "1", "--steps", "6", "--json", home=home, timeout=1200)
    return home, json.loads(done.stdout.strip().splitlines()[-1])


def test_the_adapter_clearly_beats_the_base_model(demo: tuple[Path, dict]) -> None:
    _, summary = demo
    assert summary["signature_valid"] and summary["engine"] == "deployment"
    assert summary["accuracy_base"] <= 0.2
    assert summary["accuracy_adapter"] >= summary["accuracy_base"] + 0.4, summary


def test_a_developer_pulls_it_and_peft_generates_iso_dates(demo: tuple[Path, dict], tmp_path: Path) -> None:
    home, summary = demo
    with serve_index(home, free_port()) as url:
        pulled = json.loads(commons("pull", summary["name"], "--index", url, "--json", home=tmp_path).stdout)
    from peft import PeftModel

    from modeling.load import load_base

    base, tokenizer = load_base(pulled["base_model"])
    records = make_records(16, list(STYLES), seed=4242)  # dates neither side has seen
    before = exact_match(base, tokenizer, records)["accuracy"]
    model = PeftModel.from_pretrained(base, pulled["path"])
    after = exact_match(model, tokenizer, records)["accuracy"]
    assert after >= before + 0.4 and after >= 0.5, (before, after)
    # the score exact_match takes from one teacher-forced pass is the one full greedy decoding gives
    decoded = generate(model, tokenizer, records)
    golds = [normalize(r["messages"][-1]["content"]) for r in records]
    assert after == sum(normalize(a) == g for a, g in zip(decoded, golds)) / len(records)
