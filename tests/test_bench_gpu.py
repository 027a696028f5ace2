"""bench/bench_gpu.py: skips cleanly without CUDA; its measuring path runs end to end on a tiny CPU model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import bench_gpu

TINY = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "rope_theta": 10_000.0, "tie_word_embeddings": True}


def test_without_cuda_the_benchmark_reports_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.run() == {"name": "gpu_lora_mfu", "skipped": "no CUDA device on this machine"}


def test_both_loops_train_the_same_tiny_model_and_report_consistent_figures() -> None:
    shape = bench_gpu.Shape(batch=2, seq=16, steps=2, warmup=1)
    result = bench_gpu.measure(TINY, shape, "cpu", torch.float32, peak=1.0)
    model = bench_gpu.build_model(TINY, "cpu", torch.float32)
    trainable, _total = model.get_nb_trainable_parameters()
    assert result["n_lora"] == trainable > 0
    # tied: embedding counted once
    frozen = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert result["n_base"] == frozen and result["flops_per_token"] == 4 * frozen + 6 * trainable
    for arm in ("ours", "trainer"):
        figures = result[arm]
        # every token of every batch is real
        assert figures["tokens"] == shape.steps * shape.batch * shape.seq
        assert figures["tokens_per_s"] == pytest.approx(figures["tokens"] / figures["seconds"], rel=0.01)
        assert figures["tflops"] == pytest.approx(result["flops_per_token"] * figures["tokens_per_s"] / 1e12,
                                                  abs=0.01)
        # tflops is rounded to 0.01, mfu to 1e-4
        assert figures["mfu"] == pytest.approx(figures["tflops"] / 1.0, abs=0.0051)
        assert figures["tflops_with_attention"] >= figures["tflops"]
    assert result["ratio"] == pytest.approx(
        result["ours"]["tokens_per_s"] / result["trainer"]["tokens_per_s"], rel=0.01)


def test_the_synthetic_batches_mask_the_prompt_and_are_identical_for_both_loops() -> None:
    from node.train import encode

    tokenizer = bench_gpu.SyntheticTokenizer(vocab_size=1000, seq=64)
    record = bench_gpu.synthetic_records(3)[2]
    ids, labels = encode(tokenizer, record["messages"], 64)
    assert len(ids) == 64 and labels[:16] == [-100] * 16 and labels[16:] == ids[16:]
    assert encode(tokenizer, record["messages"], 64) == (ids, labels)
    assert encode(tokenizer, bench_gpu.synthetic_records(2)[1]["messages"], 64)[0] != ids


def test_peak_and_flop_formulas() -> None:
    assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench_gpu.peak_tflops("NVIDIA H200") == 989.0
    assert bench_gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_gpu.peak_tflops("Some Future GPU") is None
    assert bench_gpu.flops_per_token(n_base=100, n_lora=10) == 460
    assert bench_gpu.attention_flops_per_token(layers=24, seq=1024, hidden=896) == 12 * 24 * 1024 * 896


def test_the_default_model_is_about_half_a_billion_parameters() -> None:
    c = bench_gpu.QWEN2_05B
    d, f, layers, kv = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                        c["num_key_value_heads"])
    head = d // c["num_attention_heads"]
    # q,o; k,v (+ biases); mlp; norms
    per_layer = d * d * 2 + 2 * d * kv * head + 2 * kv * head + d + 3 * d * f + 2 * d
    total = c["vocab_size"] * d + layers * per_layer + d
    assert 480e6 < total < 510e6


TINY_MISTRAL = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 128,
                "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False}


QLORA_SHAPE = bench_gpu.QLoraShape(batch=4, seq=16, steps=2, warmup=1, card_gb=24.0)


@pytest.fixture(scope="module")
def tiny_qlora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """qlora_step on a tiny Mistral-shaped config, on the CPU (bitsandbytes runs nf4 there too)."""
    scratch = tmp_path_factory.mktemp("qlora")
    folder = scratch / "tiny-mistral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_MISTRAL))
    return scratch, bench_gpu.qlora_step(folder, QLORA_SHAPE, "cpu", torch.float32, peak=1.0, scratch=scratch)


def test_the_qlora_step_trains_a_config_only_model_in_nf4_and_unquantized_with_the_plan(tiny_qlora) -> None:
    from modeling.memory import Device, ModelShape, Workload, plan

    scratch, result = tiny_qlora
    model_shape = ModelShape.from_config(TINY_MISTRAL)
    expected = plan(model_shape, Workload(4, 16, bench_gpu.LORA["r"]), Device("cuda", 24.0, bf16=True), "nf4")
    assert result["plan"] == {"card_gb": 24.0, **expected.to_json()}
    assert result["n_base"] == model_shape.linear_params() + 128 * 32  # the untied LM head is a matmul
    n_lora = model_shape.lora_params(bench_gpu.LORA["r"])
    assert result["flops_per_token"] == 4 * result["n_base"] + 6 * n_lora
    for arm in ("nf4", "unquantized"):
        figures = result[arm]
        assert figures["tokens"] == QLORA_SHAPE.steps * QLORA_SHAPE.batch * QLORA_SHAPE.seq
        assert figures["tokens_per_s"] == pytest.approx(figures["tokens"] / figures["seconds"], rel=0.01)
        assert figures["peak_allocated_gb"] is None  # measured on a GPU only
    assert result["nf4"]["precision"] == "nf4/float32" and result["unquantized"]["precision"] == "float32"
    assert result["nf4_peak_ratio"] is None
    assert [p.name for p in scratch.iterdir()] == ["tiny-mistral"]  # the random checkpoint is gone


def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """run() as on an H100, with the 0.5B comparison's figures made up."""
    arm = {"tokens_per_s": 10.0, "tflops": 1.0, "mfu": 0.5}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench_gpu, "measure", lambda *args: {"ratio": 1.0, "ours": arm, "trainer": arm})


def test_on_a_gpu_the_summary_names_the_qlora_steps_figures(monkeypatch, tiny_qlora) -> None:
    fake_gpu(monkeypatch)
    step = {**tiny_qlora[1], "nf4": {**tiny_qlora[1]["nf4"], "peak_allocated_gb": 17.5}}
    monkeypatch.setattr(bench_gpu, "qlora_step", lambda *args: step)
    result = bench_gpu.run()
    assert result["qlora_7b"] is step and result["ratio"] == 1.0
    assert f"peak 17.5 GB (plan {step['plan']['predicted_peak_gb']} GB)" in result["summary"]


def test_a_failing_7b_step_keeps_the_first_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch)

    def fails(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench_gpu, "qlora_step", fails)
    result = bench_gpu.run()
    assert result["ratio"] == 1.0
    assert result["qlora_7b"] == {"error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}


def test_the_qlora_model_is_a_shipped_7b_config() -> None:
    from modeling.memory import ModelShape

    shape = ModelShape.from_file(bench_gpu.MISTRAL_7B / "config.json")
    assert 7.0e9 < shape.params() < 7.5e9
