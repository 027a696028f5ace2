"""LoRA training MFU on one GPU: our node loop (node/train.py) vs a plain HF Trainer + PEFT, same run.

A random-init Qwen2-0.5B-shaped model (24 layers, d=896, vocab 151936, ~494 M parameters) is built from
its config in bf16 (no hub download), wrapped with the same LoRA (r=16 on every linear layer), and both
loops train it on the same synthetic batches (batch 8 × 1024 tokens) for the same number of steps after
a warm-up. Ours runs the model as loaded (bf16 base, PEFT's fp32 adapter weights); the Trainer runs with
`bf16=True` (autocast) as HF's recipes do. Without a CUDA device the benchmark reports {"skipped": ...}.

FLOPs per trained token, forward + backward (the usual 6·N count, adapted to a frozen base):
    base weights (frozen):   2·N_base forward + 2·N_base backward (input grads only, no weight grads)
    LoRA weights (trained):  2·N_lora forward + 4·N_lora backward (input and weight grads)
    flops/token = 4·N_base + 6·N_lora
N_base counts the weights used in matmuls (the tied embedding once, as the LM head). The attention
scores (QKᵀ, AV; 12·L·seq·d per token with frozen projections) are left out, as in the usual 6·N figure,
and reported separately as `tflops_with_attention`. MFU = achieved FLOP/s ÷ the GPU's dense bf16 peak
(H100 SXM and H200: 989 TFLOP/s).

A second figure is a QLoRA campaign step of a 7B-shaped model: Mistral-7B-v0.1 (FlowerTune's baseline)
from its shipped config.json (tests/data/model_configs/), random weights (no download) saved once to a
temporary folder and loaded the way a node loads a base: `from_pretrained` with modeling/quantization.py's
nf4 arguments, then modeling/lora.wrap. modeling/memory.plan sizes the step for a 24 GB consumer card
(checkpointing, micro-batch × accumulation of batch 8 × 512 tokens) and node/train.py runs it. The same
step on the unquantized bf16 base gives the nf4 ÷ bf16 peak-memory ratio. Peak memory is
`torch.cuda.max_memory_allocated` (and `_reserved`, what the card holds) over the warm-up and timed calls,
beside the plan's predicted peak. MFU counts useful FLOPs only: 4·N_base + 6·N_lora per token, with
N_base = the attention and MLP matrices plus the LM head; checkpointing's recomputed forward is not
credited, nor is nf4's dequantization.

Run: `.venv/bin/python -m bench.bench_gpu` (a few minutes on an H100; needs ~30 GB of GPU memory and
~15 GB of free disk for the random 7B checkpoint).
"""

from __future__ import annotations

import json
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Qwen2-0.5B's shape (config.json of Qwen/Qwen2-0.5B): built locally from these numbers.
QWEN2_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 4096,
             "rope_theta": 1_000_000.0, "tie_word_embeddings": True}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "seed": 0}
# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), matched against the device name.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
               ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]


# The QLoRA figure's model: FlowerTune's baseline base model, from its public config.json.
MISTRAL_7B = Path(__file__).resolve().parent.parent / "tests" / "data" / "model_configs" / "Mistral-7B-v0.1"


@dataclass
class Shape:
    batch: int = 8
    seq: int = 1024
    steps: int = 20
    warmup: int = 3


@dataclass
class QLoraShape:
    batch: int = 8  # the campaign's effective batch; the plan splits it into micro-batches
    seq: int = 512
    steps: int = 4
    warmup: int = 1
    card_gb: float = 24.0  # the volunteer card the step is planned for (RTX 3090/4090)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name; None when we do not know it (MFU is then not reported)."""
    for needle, peak in PEAK_TFLOPS:
        if needle.lower() in device_name.lower():
            return peak
    return None


def flops_per_token(n_base: int, n_lora: int) -> int:
    return 4 * n_base + 6 * n_lora


def attention_flops_per_token(layers: int, seq: int, hidden: int) -> int:
    """QKᵀ and AV with frozen projections: 4·seq·d forward per layer, twice that backward (input grads)."""
    return 12 * layers * seq * hidden


def count_params(model: Any) -> tuple[int, int]:
    """(N_base, N_lora): matmul weights of the frozen base (tied embedding once) and the LoRA weights."""
    seen, n_base, n_lora = set(), 0, 0
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if "lora_" in name:
            n_lora += param.numel()
        elif "embed_tokens" in name and not model.get_base_model().config.tie_word_embeddings:
            continue  # an untied input embedding is a lookup, not a matmul
        else:
            n_base += param.numel()
    return n_base, n_lora


class SyntheticTokenizer:
    """Maps each synthetic record to fixed token ids, so both loops see identical, full-length batches.

    It implements what node/train.py's `encode` calls: a chat template that names the record, and
    tokenization of that name into `seq` ids of which the first quarter is the (masked) prompt."""

    def __init__(self, vocab_size: int, seq: int) -> None:
        self.vocab_size, self.seq, self.pad_token_id = vocab_size, seq, 0

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        return f"{messages[0]['content']}|{'prompt' if add_generation_prompt else 'full'}"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        import torch

        name, part = text.rsplit("|", 1)
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        ids = torch.randint(1, self.vocab_size, (self.seq,), generator=gen).tolist()
        return {"input_ids": ids[: self.seq // 4] if part == "prompt" else ids}


def synthetic_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"record-{i}"}, {"role": "assistant", "content": "x"}]}
            for i in range(n)]


def build_model(config: dict, device: str, dtype: Any) -> Any:
    """Random-init Qwen2-style causal LM with our LoRA wrapped around it, on `device` in `dtype`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from modeling.lora import wrap

    torch.manual_seed(0)
    with torch.device(device):
        base = Qwen2ForCausalLM(Qwen2Config(**config, pad_token_id=0)).to(dtype)
    base.config.use_cache = False
    return wrap(base, LORA)


def _to_device(model: Any, device: str) -> Any:
    """node/train.py builds batches on the CPU (volunteers train there today);
    move them at the model's door."""
    def hook(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v
                      for k, v in kwargs.items()}

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ours(model: Any, tokenizer: SyntheticTokenizer, shape: Shape, device: str) -> tuple[float, int]:
    """node.train.train as a volunteer runs it: (seconds, tokens) of the timed call after a warm-up call."""
    from node.train import TrainConfig, train

    handle = _to_device(model, device)
    try:
        records = synthetic_records(shape.batch * (shape.steps + shape.warmup))
        train(model, tokenizer, records[: shape.batch * shape.warmup],
              TrainConfig(steps=shape.warmup, batch_size=shape.batch, max_length=shape.seq))
        _sync(device)
        start = time.perf_counter()
        result = train(model, tokenizer, records, TrainConfig(steps=shape.steps, batch_size=shape.batch,
                                                              max_length=shape.seq))
        _sync(device)
        return time.perf_counter() - start, result.tokens
    finally:
        handle.remove()


def time_trainer(model: Any, tokenizer: SyntheticTokenizer, shape: Shape, device: str) -> tuple[float, int]:
    """The reference: transformers.Trainer with PEFT, same batches, AdamW, constant lr, clip 1.0,
    no logging."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from node.train import collate, encode, trainable

    trainable(model, None)
    rows = [encode(tokenizer, r["messages"], shape.seq)
            for r in synthetic_records(shape.batch * (shape.steps + shape.warmup))]
    dataset = [{"input_ids": ids, "labels": labels} for ids, labels in rows]
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (shape.warmup, shape.warmup + shape.steps):
                _sync(device)
                marks[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=shape.batch, max_steps=shape.warmup + shape.steps,
            learning_rate=2e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch", bf16=device.startswith("cuda"), logging_steps=10_000,
            save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
            remove_unused_columns=False, use_cpu=not device.startswith("cuda"), seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Clock()],
                          data_collator=lambda batch: collate([(b["input_ids"], b["labels"]) for b in batch],
                                                              tokenizer.pad_token_id))
        trainer.train()
    return marks[shape.warmup + shape.steps] - marks[shape.warmup], shape.steps * shape.batch * shape.seq


def measure(config: dict, shape: Shape, device: str, dtype: Any, peak: float | None) -> dict:
    """Both loops on the same model shape, in this order: ours, then the Trainer on a fresh copy."""
    import torch

    model = build_model(config, device, dtype)
    n_base, n_lora = count_params(model)
    tokenizer = SyntheticTokenizer(config["vocab_size"], shape.seq)
    per_token = flops_per_token(n_base, n_lora)
    with_attention = per_token + attention_flops_per_token(config["num_hidden_layers"], shape.seq,
                                                           config["hidden_size"])
    arms = {}
    for arm, timer in (("ours", time_ours), ("trainer", time_trainer)):
        if arm == "trainer":
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            model = build_model(config, device, dtype)
        seconds, tokens = timer(model, tokenizer, shape, device)
        tflops = per_token * tokens / seconds / 1e12
        arms[arm] = {
            "tokens_per_s": round(tokens / seconds, 1), "tflops": round(tflops, 2),
            "tflops_with_attention": round(with_attention * tokens / seconds / 1e12, 2),
            "mfu": round(tflops / peak, 4) if peak else None, "seconds": round(seconds, 6), "tokens": tokens,
        }
    return {
        "ratio": round(arms["ours"]["tokens_per_s"] / arms["trainer"]["tokens_per_s"], 3),
        "ours": arms["ours"], "trainer": arms["trainer"], "n_base": n_base, "n_lora": n_lora,
        "flops_per_token": per_token, "batch": shape.batch, "seq": shape.seq, "steps": shape.steps,
        "peak_tflops": peak, "dtype": str(dtype).removeprefix("torch."),
    }


def random_checkpoint(folder: Path, out: Path, device: str, dtype: Any) -> Any:
    """A random-init model from `folder`'s config.json, saved to `out` as a model folder;
    returns the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    model.config.use_cache = False
    model.save_pretrained(out)
    return model


def load_nf4(out: Path, device: str, dtype: Any) -> Any:
    """The base in nf4, as modeling/load.load_base loads one (that also wants a tokenizer: we have none)."""
    from transformers import AutoModelForCausalLM

    from modeling.quantization import from_pretrained_kwargs

    extra = from_pretrained_kwargs("nf4", dtype, device)
    base = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, **extra)
    base.config.use_cache = False
    base.eval()
    for param in base.parameters():
        param.requires_grad_(False)
    return base


def campaign_step(model: Any, shape: QLoraShape, memory: Any, vocab: int, device: str, per_token: int,
                  peak: float | None) -> dict:
    """node/train.py as a volunteer runs it with `memory`'s plan: a warm-up call, then the timed call.
    Peak memory (GPU only) covers both calls, the weights included."""
    import torch

    from modeling.quantization import TrainedAs
    from node.train import TrainConfig, train

    tokenizer = SyntheticTokenizer(vocab, shape.seq)
    records = synthetic_records(shape.batch * (shape.warmup + shape.steps))

    def config(steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=shape.batch, max_length=shape.seq,
                           micro_batch=memory.micro_batch,
                           gradient_checkpointing=memory.gradient_checkpointing)

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else None  # the wrapped model, before any step
    train(model, tokenizer, records[: shape.batch * shape.warmup], config(shape.warmup))
    _sync(device)
    start = time.perf_counter()
    result = train(model, tokenizer, records[shape.batch * shape.warmup :], config(shape.steps))
    _sync(device)
    seconds = time.perf_counter() - start
    tflops = per_token * result.tokens / seconds / 1e12
    return {
        "precision": TrainedAs.of(model).label(), "tokens": result.tokens, "seconds": round(seconds, 6),
        "tokens_per_s": round(result.tokens / seconds, 1), "tflops": round(tflops, 2),
        "mfu": round(tflops / peak, 4) if peak else None,
        "model_gb": round(resident, 2) if cuda else None,
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
    }


def qlora_step(folder: Path, shape: QLoraShape, device: str, dtype: Any, peak: float | None,
               scratch: Path | None = None) -> dict:
    """The planned step on the nf4 base and on the unquantized base: throughput, MFU and peak memory.
    The random checkpoint is written to a temporary folder under `scratch` (the system's by default)."""
    import gc

    import torch

    from modeling.lora import wrap
    from modeling.memory import Device, ModelShape, Workload, plan

    # plan the step for the volunteer's card, from config.json alone (as a node does before loading)
    model_shape = ModelShape.from_config(json.loads((folder / "config.json").read_text()), name=folder.name)
    work = Workload(shape.batch, shape.seq, LORA["r"])
    memory = plan(model_shape, work, Device("cuda", shape.card_gb, bf16=True), "nf4")
    n_base = model_shape.linear_params() + model_shape.vocab * model_shape.hidden  # matrices and the LM head
    per_token = flops_per_token(n_base, model_shape.lora_params(LORA["r"]))
    arms = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=scratch) as out:
        # the unquantized base first: it is the model just built and saved
        model = wrap(random_checkpoint(folder, Path(out), device, dtype), LORA)
        arms["unquantized"] = campaign_step(model, shape, memory, model_shape.vocab, device, per_token, peak)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        # then the same weights through bitsandbytes, as the volunteer's node loads them
        model = wrap(load_nf4(Path(out), device, dtype), LORA)
        arms["nf4"] = campaign_step(model, shape, memory, model_shape.vocab, device, per_token, peak)
    nf4, full = arms["nf4"], arms["unquantized"]
    ratio = nf4["peak_allocated_gb"] / full["peak_allocated_gb"] if full["peak_allocated_gb"] else None
    return {
        "model": folder.name, "n_base": n_base, "flops_per_token": per_token, "batch": shape.batch,
        "seq": shape.seq, "steps": shape.steps, "dtype": str(dtype).removeprefix("torch."),
        "plan": {"card_gb": shape.card_gb, **memory.to_json()},
        "nf4": nf4, "unquantized": full, "nf4_peak_ratio": round(ratio, 3) if ratio else None,
    }


def run(shape: Shape | None = None, qlora: QLoraShape | None = None) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"name": "gpu_lora_mfu", "skipped": "no CUDA device on this machine"}
    device_name = torch.cuda.get_device_name(0)
    peak = peak_tflops(device_name)
    result = measure(QWEN2_05B, shape or Shape(), "cuda", torch.bfloat16, peak)
    torch.cuda.empty_cache()
    ours, ref = result["ours"], result["trainer"]
    mfu = (lambda arm: f"MFU {arm['mfu']:.1%}" if arm["mfu"] is not None else f"{arm['tflops']} TFLOP/s")
    summary = (f"{device_name}: ours {ours['tokens_per_s']:.0f} tok/s {mfu(ours)}, Trainer+PEFT "
               f"{ref['tokens_per_s']:.0f} tok/s {mfu(ref)}")
    try:
        step = qlora_step(MISTRAL_7B, qlora or QLoraShape(), "cuda", torch.bfloat16, peak)
    except Exception as exc:  # noqa: BLE001 - GPU time is scarce: keep the figures above if the 7B step fails
        step = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        summary += f"; QLoRA 7B step failed ({step['error']})"
    else:
        nf4 = step["nf4"]
        summary += (f"; QLoRA {step['model']} step {mfu(nf4)}, peak {nf4['peak_allocated_gb']} GB (plan "
                    f"{step['plan']['predicted_peak_gb']} GB), nf4/bf16 peak {step['nf4_peak_ratio']}")
    return {"name": "gpu_lora_mfu", "device": device_name, **result, "qlora_7b": step, "summary": summary}


if __name__ == "__main__":
    print(json.dumps(run()))
