"""The memory plan (modeling/memory.py): arithmetic from config.json only, on five real model families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from modeling.memory import (
    Device,
    ModelShape,
    Workload,
    estimate,
    lowest_first_layer,
    lowest_layer,
    peak_gb,
    plan,
)
from protocol.errors import CommonsError

CONFIGS = Path(__file__).parent / "data" / "model_configs"
FAMILIES = ["Qwen2.5-0.5B", "SmolLM2-1.7B", "gemma-2-2b", "Mistral-7B-v0.1", "Llama-3.1-8B"]
SIZES_GB = [6, 8, 12, 16, 24, 80]
CAMPAIGN = Workload(batch_size=8, max_length=512, lora_r=8)  # a realistic volunteer campaign
# What the plan chooses on a bf16 GPU with that much free memory: quantization(+ckpt) micro×accumulation.
EXPECTED = {
    "Qwen2.5-0.5B": ["none 2x4", "none 2x4", "none 4x2", "none 8x1", "none 8x1", "none 8x1"],
    "SmolLM2-1.7B": ["none 1x8", "none 2x4", "none 4x2", "none 4x2", "none 8x1", "none 8x1"],
    "gemma-2-2b": ["refused", "none+ckpt 1x8", "none 1x8", "none 2x4", "none 4x2", "none 8x1"],
    "Mistral-7B-v0.1": ["refused", "nf4+ckpt 2x4", "nf4+ckpt 4x2", "nf4 1x8", "none 2x4", "none 8x1"],
    "Llama-3.1-8B": ["refused", "refused", "nf4+ckpt 1x8", "nf4+ckpt 4x2", "none 1x8", "none 8x1"],
}


def shape(name: str) -> ModelShape:
    return ModelShape.from_file(CONFIGS / name / "config.json")


def summary(name: str, gb: float) -> str:
    try:
        chosen = plan(shape(name), CAMPAIGN, Device("cuda", gb, bf16=True))
    except CommonsError:
        return "refused"
    ckpt = "+ckpt" if chosen.gradient_checkpointing else ""
    return f"{chosen.quantization}{ckpt} {chosen.micro_batch}x{chosen.accumulation}"


def test_the_arithmetic_counts_every_parameter_of_five_real_model_families() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in FAMILIES:
        with torch.device("meta"):  # shapes only: no memory, no download
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIGS / name))
        total = sum(p.numel() for p in model.parameters())
        assert shape(name).params() == total, name


@pytest.mark.parametrize("name", FAMILIES)
def test_the_plan_answers_for_each_shipped_config_at_6_to_80_gb(name: str) -> None:
    assert [summary(name, gb) for gb in SIZES_GB] == EXPECTED[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_plan_always_fits_what_it_was_given_and_more_memory_never_costs_speed(name: str) -> None:
    ladder = []
    for gb in SIZES_GB:
        device = Device("cuda", gb, bf16=True)
        try:
            chosen = plan(shape(name), CAMPAIGN, device)
        except CommonsError:
            assert not ladder, "a plan that fit less memory must fit more"
            continue
        assert chosen.predicted_peak_gb <= device.usable_gb < gb
        assert chosen.micro_batch * chosen.accumulation == CAMPAIGN.batch_size
        ladder.append((chosen.quantization != "none", chosen.gradient_checkpointing, -chosen.micro_batch))
    assert ladder == sorted(ladder, reverse=True)


def test_a_refusal_is_one_line_that_says_what_is_needed_and_what_is_free() -> None:
    with pytest.raises(CommonsError) as caught:
        plan(shape("Llama-3.1-8B"), CAMPAIGN, Device("cuda", 8.0, bf16=True))
    message = str(caught.value)
    assert "\n" not in message
    needed = float(message.split("needs ")[1].split(" GB")[0])
    assert message.startswith(f"needs {needed:.1f} GB, 8.0 GB free: ") and needed > 8.0
    enough = Device("cuda", needed + 0.1, bf16=True)
    assert plan(shape("Llama-3.1-8B"), CAMPAIGN, enough).quantization == "nf4"


def test_nf4_holds_a_7b_base_in_a_third_of_its_bf16_weight_memory() -> None:
    mistral = shape("Mistral-7B-v0.1")
    bf16 = estimate(mistral, CAMPAIGN, "none", "bfloat16", False, 1)["weights"]
    nf4 = estimate(mistral, CAMPAIGN, "nf4", "bfloat16", False, 1)["weights"]
    assert 0.25 < nf4 / bf16 < 0.35  # 4-bit matrices, float32 embeddings (prepare_model_for_kbit_training)


def test_checkpointing_and_smaller_micro_batches_lower_the_peak_and_nothing_else_changes() -> None:
    llama = shape("Llama-3.1-8B")
    full = estimate(llama, CAMPAIGN, "nf4", "bfloat16", False, 8)
    ckpt = estimate(llama, CAMPAIGN, "nf4", "bfloat16", True, 8)
    small = estimate(llama, CAMPAIGN, "nf4", "bfloat16", False, 2)
    assert ckpt["activations"] < full["activations"] / 5 and small["activations"] == full["activations"] / 4
    assert ckpt["weights"] == full["weights"] == small["weights"]


def test_a_span_that_starts_higher_needs_less_memory_so_a_small_card_may_train_the_top_layers() -> None:
    mistral = shape("Mistral-7B-v0.1")
    work = Workload(batch_size=8, max_length=2048, lora_r=8)
    peaks = [peak_gb(estimate(mistral, Workload(8, 2048, 8, first_layer=f), "nf4", "bfloat16", False, 8))
             for f in (0, 16, 31)]
    assert peaks[0] > peaks[1] > peaks[2]
    floor = lowest_first_layer(mistral, work, Device("cuda", 9.0, bf16=True), "nf4")
    assert floor is not None and 0 < floor < 32  # 2048-token sequences: a 9 GB card keeps the upper layers
    assert lowest_first_layer(mistral, work, Device("cuda", 80.0, bf16=True), "nf4") == 0
    assert lowest_first_layer(mistral, work, Device("cuda", 4.0, bf16=True), "nf4") is None


def test_a_node_reads_its_memory_from_its_capability_report() -> None:
    gpu = Device.from_capability({"device": "cuda", "vram_gb": 10.0, "bf16": True, "ram_gb": 64.0})
    cpu = Device.from_capability({"device": "cpu", "vram_gb": None, "ram_gb": 32.0, "ram_free_gb": 12.5})
    old = Device.from_capability({"device": "cpu", "vram_gb": None, "ram_gb": 16.0})
    assert (gpu.kind, gpu.free_gb, gpu.dtype) == ("cuda", 10.0, "bfloat16")
    assert (cpu.kind, cpu.free_gb, cpu.dtype) == ("cpu", 12.5, "float32")
    assert old.free_gb == 16.0
    assert Device.from_capability({"device": "cpu"}).free_gb == float("inf")  # cannot tell: plan as today


def test_a_campaign_may_pin_the_quantization_and_an_unknown_one_is_refused() -> None:
    qwen = shape("Qwen2.5-0.5B")
    assert plan(qwen, CAMPAIGN, Device("cuda", 80, bf16=True), "nf4").quantization == "nf4"
    assert plan(qwen, CAMPAIGN, Device("mps", 80), "auto").quantization == "none"
    with pytest.raises(CommonsError, match="use one of auto, none, nf4, int8"):
        plan(qwen, CAMPAIGN, Device("cuda", 80, bf16=True), "fp4")


def test_the_lowest_layer_of_a_shard_comes_from_its_keys() -> None:
    keys = ["base_model.model.model.layers.7.mlp.up_proj.lora_A.weight",
            "base_model.model.model.layers.12.self_attn.q_proj.lora_B.weight"]
    assert lowest_layer(keys) == 7 and lowest_layer(None) == 0 and lowest_layer([]) == 0


def test_a_config_without_a_decoders_sizes_is_refused_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(CommonsError, match="config.json has no num_attention_heads"):
        ModelShape.from_file(tmp_path / "config.json")


def test_commons_node_plan_prints_the_plan_or_refuses_in_one_line() -> None:
    from commons.cli import cli

    runner = CliRunner()
    folder = str(CONFIGS / "Llama-3.1-8B")
    done = runner.invoke(cli, ["node", "plan", "--model", folder, "--vram", "12", "--max-length", "512",
                               "--json"])
    assert done.exit_code == 0, done.output
    answer = json.loads(done.output)
    assert answer["quantization"] == "nf4" and answer["gradient_checkpointing"] and answer["micro_batch"] == 1
    assert answer["accumulation"] == 8 and answer["predicted_peak_gb"] < 12
    text = runner.invoke(cli, ["node", "plan", "--model", folder, "--ram", "64"])
    assert text.exit_code == 0 and "quantization            none" in text.output
    refused = runner.invoke(cli, ["node", "plan", "--model", folder, "--vram", "6"])
    assert refused.exit_code != 0 and str(refused.exception).startswith("needs ")
    assert "6.0 GB free" in str(refused.exception)


@pytest.mark.slow  # ~5 min on 2 cores: real SmolLM2 training steps, each case in a fresh process
@pytest.mark.parametrize("case", [("none", False, 8, 8, 128), ("nf4", True, 8, 8, 128)])
def test_the_predicted_peak_is_within_20_percent_of_real_smollm2_training_steps(case: tuple) -> None:
    from bench.bench_memory import measure

    row = measure("smollm2", case)
    assert abs(row["measured_gb"] / row["predicted_gb"] - 1) <= 0.20, row
    assert abs(row["rss_gb"] / row["predicted_gb"] - 1) <= 0.20, row
