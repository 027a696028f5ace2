"""A volunteer keeps its AdamW state across the rounds of one campaign on one shard (node/worker.py), and
starts it over when the keys, the campaign or the round sequence change. Tiny model, in this process."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from commons.demo_task import write_demo_data
from coordinator import rounds
from coordinator.campaign import parse
from modeling.load import load_base
from modeling.lora import get_state, wrap
from node import worker
from node.settings import NodeSettings

STEPS = 2


@pytest.fixture
def node(tmp_path: Path, one_torch_thread: None) -> dict:
    data = write_demo_data(tmp_path / "data", 1, 8, 2)
    campaign = parse({"name": "kept", "base_model": "tiny", "eval_file": str(data["test"]), "min_nodes": 1,
                      "train": {"steps": STEPS, "batch_size": 2, "max_length": 48, "lr": 0.02}}, tmp_path)
    tensors = get_state(wrap(load_base("tiny")[0], {**campaign.lora.__dict__}))
    (tmp_path / "node").mkdir()
    worker.forget_optimizers()
    yield {"campaign": campaign, "tensors": tensors, "keys": sorted(tensors),
           "settings": NodeSettings(home=tmp_path / "node", data=data["train"][0], threads=1)}
    worker.forget_optimizers()


def adam_steps(settings: NodeSettings) -> int:
    """The step count of the AdamW state the node kept after its last round."""
    return int(worker._OPTIMIZERS[str(settings.home)].state["state"][0]["step"])


def train(node: dict, round_: int, keys: list[str], campaign: str = "kept") -> dict[str, np.ndarray]:
    instruction = replace(rounds.train_instruction(node["campaign"], round_, keys), campaign=campaign)
    wire, _, _ = worker.train_round(node["settings"], instruction, node["tensors"])
    return wire


def test_adamw_goes_on_across_rounds_of_the_same_campaign_and_keys(node: dict) -> None:
    train(node, 1, node["keys"])
    assert adam_steps(node["settings"]) == STEPS
    kept = train(node, 2, node["keys"])
    assert adam_steps(node["settings"]) == 2 * STEPS
    worker.forget_optimizers()
    fresh = train(node, 2, node["keys"])  # the same round from the same global adapter, AdamW new
    assert adam_steps(node["settings"]) == STEPS
    assert any(not np.array_equal(kept[k], fresh[k]) for k in kept)


def test_adamw_starts_over_when_the_keys_campaign_or_round_sequence_change(node: dict) -> None:
    half = node["keys"][: len(node["keys"]) // 2]
    train(node, 1, node["keys"])
    train(node, 2, half)  # the plan gave this node another span
    assert adam_steps(node["settings"]) == STEPS
    train(node, 3, half, campaign="another")
    assert adam_steps(node["settings"]) == STEPS
    train(node, 4, half, campaign="another")
    assert adam_steps(node["settings"]) == 2 * STEPS
    train(node, 1, half, campaign="another")  # the campaign started over (a restart): round 1 again
    assert adam_steps(node["settings"]) == STEPS
