"""A coordinator's instruction is data, checked against the volunteer's own bounds (node/limits.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from node import limits
from node.settings import NodeSettings
from node.worker import train_round
from protocol.errors import CommonsError
from protocol.instruction import TrainInstruction

GOOD = TrainInstruction(campaign="c", round=1, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                        base_revision="main", lora={"r": 8}, steps=10, batch_size=4, lr=2e-4, max_length=256,
                        upload_dtype="int8")
CAMPAIGN = {"data": "campaign", "datasets": ("QmA", "QmB"), "data_source": "https://index.example.org"}


def refused(**change) -> str:
    with pytest.raises(CommonsError) as err:
        limits.check(replace(GOOD, **change), limits.NodeLimits())
    return str(err.value)


def test_an_ordinary_instruction_passes() -> None:
    limits.check(GOOD, limits.NodeLimits())
    limits.check(replace(GOOD, base_model="tiny", **CAMPAIGN), limits.NodeLimits())


def test_each_bound_is_refused_in_one_line_naming_the_setting() -> None:
    assert refused(lora={"r": 512}) == (
        "refused the coordinator's instruction: LoRA rank 512 is above this node's limit 256 (raise "
        "node_limits.max_rank in config.toml to allow it)")
    assert "steps 1000000 is above" in refused(steps=1_000_000)
    assert "batch_size 4096 is above" in refused(batch_size=4096)
    assert "max_length 100000 is above" in refused(max_length=100_000)
    assert "steps 0 must be at least 1" in refused(steps=0)
    assert "LoRA rank 0 must be at least 1" in refused(lora={"alpha": 16})  # no rank: the node guesses none
    assert "learning rate" in refused(lr=float("nan"))
    assert "upload_dtype 'pickle'" in refused(upload_dtype="pickle")
    assert "datasets 65 is above" in refused(**{**CAMPAIGN, "datasets": ("Qm",) * 65})
    assert "datasets 0 must be at least 1" in refused(**{**CAMPAIGN, "datasets": ()})


def test_a_coordinator_cannot_point_the_node_at_local_paths_or_other_schemes() -> None:
    assert "is not a Hugging Face id" in refused(base_model="/etc/passwd")
    assert "is not a Hugging Face id" in refused(base_model="../../home/me/.ssh")
    assert "not an http(s) URL" in refused(**{**CAMPAIGN, "data_source": "file:///home/me/.commons/identity"})


def test_a_volunteer_raises_a_bound_in_config_toml(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[node_limits]\nmax_rank = 1024\n")
    limits.check(replace(GOOD, lora={"r": 512}), limits.read(tmp_path))
    assert "allow_local_base = true" in refused(base_model=str(tmp_path))
    (tmp_path / "config.toml").write_text("[node_limits]\nallow_local_base = true\n")
    limits.check(replace(GOOD, base_model=str(tmp_path)), limits.read(tmp_path))
    (tmp_path / "config.toml").write_text("[node_limits]\nallow_local_base = 1\n")
    with pytest.raises(CommonsError, match="must be true or false"):
        limits.read(tmp_path)
    (tmp_path / "config.toml").write_text("[node_limits]\nmax_rnak = 1024\n")
    with pytest.raises(CommonsError, match="unknown node limit 'max_rnak'"):
        limits.read(tmp_path)
    (tmp_path / "config.toml").write_text("[node_limits]\nmax_rank = -1\n")
    with pytest.raises(CommonsError, match="must be a positive whole number"):
        limits.read(tmp_path)


def test_the_node_refuses_before_it_loads_a_model_or_reads_data(tmp_path: Path) -> None:
    settings = NodeSettings(home=tmp_path, data=tmp_path / "missing.jsonl")
    with pytest.raises(CommonsError, match="LoRA rank 4096"):
        train_round(settings, replace(GOOD, lora={"r": 4096}), {"x": np.zeros(1, np.float32)})
