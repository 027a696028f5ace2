"""Quantized base models (modeling/quantization.py): nf4 and int8 through bitsandbytes on the tiny model,
the adapter that stays plain PEFT, and how each node trained, recorded from its reply to the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord

from commons.demo_task import STYLES, make_records
from coordinator.campaign import parse
from coordinator.publish import record_training
from modeling.load import load_base
from modeling.lora import get_state, set_state, wrap
from modeling.quantization import TrainedAs, from_pretrained_kwargs
from node import hardware, worker
from node.train import TrainConfig, train
from protocol.errors import CommonsError
from protocol.instruction import TrainInstruction

SPEC = {"r": 4, "alpha": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_base_trains_lora_whose_adapter_loads_on_the_unquantized_base(quantization: str) -> None:
    base, tokenizer = load_base("tiny", quantization=quantization)
    model = wrap(base, SPEC)
    assert TrainedAs.of(model) == TrainedAs(quantization, "float32")
    records = make_records(8, list(STYLES), seed=1)
    result = train(model, tokenizer, records, TrainConfig(steps=2, batch_size=4, lr=5e-2))
    assert all(np.isfinite(v).all() for v in result.state.values())
    plain = wrap(load_base("tiny")[0], SPEC)
    assert set(get_state(plain)) == set(result.state)  # the same PEFT keys, plain float32 tensors
    set_state(plain, result.state)
    assert TrainedAs.of(plain).label() == "float32"


def test_nf4_stays_close_to_the_full_precision_base() -> None:
    records = make_records(8, list(STYLES), seed=2)
    losses = {}
    for quantization in ("none", "nf4"):
        base, tokenizer = load_base("tiny", quantization=quantization)
        result = train(wrap(base, SPEC), tokenizer, records, TrainConfig(steps=1, batch_size=8, lr=0.0))
        losses[quantization] = result.loss
    assert abs(losses["nf4"] - losses["none"]) < 0.02 * losses["none"]


def test_how_a_node_trained_round_trips_through_its_reply_metrics() -> None:
    cases = [(TrainedAs("nf4", "bfloat16"), (4, 16)), (TrainedAs("int8", "float32"), (8, 32)),
             (TrainedAs("none", "bfloat16"), (16, 16)), (TrainedAs("none", "float32"), (32, 32))]
    for trained, bits in cases:
        metrics = trained.to_metrics()
        MetricRecord(metrics)  # Flower carries numbers only
        assert (metrics["base_bits"], metrics["compute_bits"]) == bits
        assert TrainedAs.from_metrics(dict(metrics)) == trained
    assert TrainedAs.from_metrics({"loss": 1.0}) is None  # an older node
    assert TrainedAs("nf4", "bfloat16").label() == "nf4/bfloat16"
    assert TrainedAs("none", "float32").label() == "float32"


def test_the_ledger_lists_each_way_a_node_held_the_base() -> None:
    entry = {"node": "ab", "rounds": 2}
    record_training(entry, {"base_bits": 4, "compute_bits": 16})
    record_training(entry, {"base_bits": 4, "compute_bits": 16})
    record_training(entry, {"base_bits": 16, "compute_bits": 16})
    record_training(entry, {"loss": 1.0})
    assert entry["trained_as"] == ["nf4/bfloat16", "bfloat16"]


def test_an_unknown_quantization_is_refused_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(CommonsError, match="use one of none, nf4, int8"):
        from_pretrained_kwargs("fp4", "float32", "cpu")
    (tmp_path / "eval.jsonl").write_text("")
    raw = {"name": "q", "base_model": "tiny", "eval_file": "eval.jsonl"}
    assert parse(raw, tmp_path).quantization == "auto"
    assert parse({**raw, "quantization": "nf4"}, tmp_path).quantization == "nf4"
    with pytest.raises(CommonsError, match="quantization = 'fp4' is unknown: use one of auto, none, nf4"):
        parse({**raw, "quantization": "fp4"}, tmp_path)


def test_a_node_refuses_a_round_its_memory_plan_cannot_finish(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hardware, "detect", lambda *a: {"device": "cpu", "vram_gb": None, "cpu_cores": 2,
                                                         "ram_gb": 8.0, "ram_free_gb": 0.5, "bf16": False})
    settings = worker.NodeSettings(home=tmp_path, data=tmp_path / "train.jsonl")
    config = TrainInstruction(campaign="c", round=1, base_model="tiny", base_revision="main", lora=SPEC,
                              steps=1, batch_size=8, lr=0.01, max_length=128)
    with pytest.raises(CommonsError, match=r"^needs \d+\.\d GB, 0\.5 GB free: "):
        worker.train_round(settings, config, {})


def test_an_nf4_campaign_runs_and_its_manifest_says_how_nodes_trained_and_how_it_was_scored(
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from test_runner import LocalGrid
    from test_runner import setup as campaign_setup

    from coordinator import runner
    from protocol.signing.manifest import verify_directory

    campaign, data, home = campaign_setup(tmp_path, 2, rounds=1, shards="none", quantization="nf4",
                                          publish_margin=-1.0)
    result = runner.run(LocalGrid(tmp_path, data, ["honest"] * 2), campaign, home)
    assert result["published"]
    assert [entry["trained_as"] for entry in result["ledger"]] == [["nf4/float32"]] * 2
    meta = verify_directory(Path(result["adapter_dir"])).meta
    assert meta.eval["base_precision"] == "float32"
    assert all(entry["trained_as"] == ["nf4/float32"] for entry in meta.ledger)
    PeftModel.from_pretrained(load_base("tiny")[0], result["adapter_dir"])  # plain PEFT on the fp32 base
