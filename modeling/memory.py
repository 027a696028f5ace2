"""How much memory a LoRA round needs, from a model's config.json alone, and the plan that fits a machine.

    >>> shape = ModelShape.from_file(Path("Mistral-7B-v0.1/config.json"))
    >>> work = Workload(batch_size=8, max_length=512, lora_r=8)
    >>> plan(shape, work, Device("cuda", free_gb=8.0, bf16=True))       # node: before loading anything
    MemoryPlan(quantization='nf4', gradient_checkpointing=True, micro_batch=2, accumulation=4, ...)
    >>> lowest_first_layer(shape, work, Device.from_capability(caps))    # coordinator: a span's lowest start

Arithmetic, no torch and no weights, so the coordinator sizes shards and a volunteer reads `commons node
plan` before a byte is downloaded. The peak of one optimizer step is the sum of

    weights      frozen base: 2 or 4 bytes a parameter, or 4-bit nf4 / 8-bit int8 attention and MLP
                 matrices; `prepare_model_for_kbit_training` turns everything it leaves unquantized
                 (embeddings, untied LM head, norms) into float32, so that is counted in float32
    adapter      LoRA A and B in float32, plus a gradient and two Adam moments for the trained ones
    activations  what autograd keeps for the backward pass, per token of a padded micro-batch and per
                 layer from the lowest trained one to the top (gradients flow through every layer above):
                 norm inputs and outputs, q/k/v after RoPE (k/v repeated to all heads when the batch is
                 padded), the attention output, its log-sum-exp and mask, the four MLP tensors and the
                 rank-r LoRA intermediates; with gradient checkpointing only each layer's input, plus one
                 layer recomputed during the backward pass
    logits       the log-softmax output, its gradient and the logits' gradient: 3 × vocab float32 a token
                 (measured: the tiny model, whose peak is nearly all logits, peaks at exactly these three)
    workspace    temporaries of the backward pass, about one layer's activations; a quantized matrix is
                 dequantized while it is used

The element counts per layer were read off the tensors autograd saves (`saved_tensors_hooks`) on
SmolLM2, and the sum checked against the measured peak of real CPU training steps (bench/bench_memory.py;
the table is in docs/federation.md). It predicts tensor memory, what `torch.cuda.max_memory_allocated`
reports on a GPU; a machine gives `free − SAFETY_GB − SAFETY_FRACTION × free` for it, the rest being the
CUDA context and allocator slack on a GPU, the Python and torch runtime and allocator slack on a CPU.

The plan takes the first configuration that fits from a ladder ordered by what it costs in speed and
fidelity: full precision before nf4, no checkpointing before checkpointing, and within each the largest
micro-batch that divides the campaign's batch (the rest is gradient accumulation: same update).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modeling.load import DEFAULT_TARGETS
from protocol.errors import CommonsError

GB = 2**30
SAFETY_GB = 0.5
SAFETY_FRACTION = 0.10
QUANTIZATIONS = ("none", "nf4", "int8")
AUTO_LADDER = ("none", "nf4")  # int8 only when a campaign asks for it: it is slower than nf4 and no smaller
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, uint8 absmax per 64, float32 per 256 absmax
INT8_BYTES = 1.0
WORKSPACE_LAYERS = 1.0  # backward temporaries, in layers' worth of activations
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on (Llama, Mistral, Qwen2, Gemma-2)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    norms_per_layer: int = 2
    qkv_bias: bool = False
    name: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "") -> ModelShape:
        """Raises CommonsError naming the missing key (a config.json without a decoder's sizes)."""
        config = config.get("text_config") or config
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            model_type = str(config.get("model_type", ""))
            return cls(
                vocab=int(config["vocab_size"]), hidden=hidden, intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                tied=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
                norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
                qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
                name=name or str(config.get("_name_or_path", "")),
            )
        except KeyError as exc:
            raise CommonsError(f"config.json has no {exc.args[0]}: pass a decoder-only language model's "
                               "config (Llama, Mistral, Qwen2, Gemma-2 …)") from None

    @classmethod
    def from_file(cls, path: Path) -> ModelShape:
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CommonsError(f"cannot read {path}: {exc}; pass a model folder with config.json") from None
        return cls.from_config(config, name=Path(path).parent.name)

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def matrices(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer: what nf4/int8 quantize and LoRA targets."""
        d, i = self.hidden, self.intermediate
        return {"q_proj": (d, self.q), "k_proj": (d, self.kv), "v_proj": (d, self.kv), "o_proj": (self.q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.matrices().values())

    def other_params(self) -> int:
        """Embeddings, the LM head when untied, norms and biases: never quantized."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = (self.layers * self.norms_per_layer + 1) * self.hidden
        bias = self.layers * (self.q + 2 * self.kv) if self.qkv_bias else 0
        return embeddings + norms + bias

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, r: int, targets: tuple[str, ...] = tuple(DEFAULT_TARGETS)) -> int:
        """LoRA A and B of every layer (targets this shape does not have are skipped)."""
        sizes = self.matrices()
        return self.layers * sum(r * (sizes[t][0] + sizes[t][1]) for t in targets if t in sizes)


@dataclass(frozen=True)
class Workload:
    """What a round asks of a node: the campaign's effective batch, sequence length and LoRA."""

    batch_size: int = 8
    max_length: int = 128
    lora_r: int = 8
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = tuple(DEFAULT_TARGETS)
    first_layer: int = 0  # the lowest layer this node trains: the backward pass runs from the top down to it


@dataclass(frozen=True)
class Device:
    """Where a node trains and how much memory it has free (GB, 2**30 bytes)."""

    kind: str  # cuda | mps | cpu
    free_gb: float
    bf16: bool = False

    @property
    def usable_gb(self) -> float:
        return max(0.0, self.free_gb - SAFETY_GB - SAFETY_FRACTION * self.free_gb)

    @property
    def dtype(self) -> str:
        """What node.hardware.train_placement trains in: bf16 on CUDA cards that have it, else float32."""
        return "bfloat16" if self.kind == "cuda" and self.bf16 else "float32"

    @classmethod
    def from_capability(cls, caps: dict[str, Any]) -> Device:
        """From a node's capability report (node/hardware.py): free VRAM on a GPU, else free (or total) RAM;
        a machine that cannot tell is planned as unbounded (the plan then changes nothing)."""
        kind = str(caps.get("device") or "cpu")
        if kind == "cuda" and caps.get("vram_gb"):
            return cls("cuda", float(caps["vram_gb"]), bool(caps.get("bf16", False)))
        ram = caps.get("ram_free_gb") or caps.get("ram_gb")
        return cls(kind, float(ram) if ram else math.inf, False)


@dataclass(frozen=True)
class MemoryPlan:
    quantization: str
    dtype: str
    gradient_checkpointing: bool
    micro_batch: int
    accumulation: int
    predicted_peak_gb: float
    usable_gb: float
    parts_gb: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _dtype_bytes(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def estimate(shape: ModelShape, work: Workload, quantization: str, dtype: str, checkpointing: bool,
             micro_batch: int) -> dict[str, float]:
    """Predicted peak bytes of one optimizer step, by part (see the module docstring)."""
    if quantization not in QUANTIZATIONS:
        raise CommonsError(_unknown(quantization))
    weight_bytes = _dtype_bytes(dtype)
    act = weight_bytes
    if quantization == "none":
        weights = shape.params() * weight_bytes
    else:  # prepare_model_for_kbit_training: what stays unquantized becomes float32, and so does the stream
        per = NF4_BYTES if quantization == "nf4" else INT8_BYTES
        weights = shape.linear_params() * per + shape.other_params() * 4
        act = 4
    first = min(max(work.first_layer, 0), shape.layers - 1)
    backward_layers = shape.layers - first
    lora = shape.lora_params(work.lora_r, work.targets)
    adapter = lora * 4 + lora * backward_layers / shape.layers * 12  # grads + two Adam moments
    tokens = micro_batch * work.max_length
    layer = tokens * _layer_bytes(shape, work, act)
    if checkpointing:
        activations = backward_layers * tokens * shape.hidden * act + layer
    else:
        activations = backward_layers * layer
    logits = 3 * tokens * shape.vocab * 4
    workspace = WORKSPACE_LAYERS * layer
    if quantization != "none":  # each quantized matrix is dequantized to the compute dtype when used
        workspace += 2 * max(a * b for a, b in shape.matrices().values()) * weight_bytes
    return {"weights": weights, "adapter": adapter, "activations": activations, "logits": logits,
            "workspace": workspace}


def _layer_bytes(shape: ModelShape, work: Workload, act: int) -> float:
    """Bytes autograd keeps per token for one trained layer (a padded batch: the worst case)."""
    d, i, q = shape.hidden, shape.intermediate, shape.q
    norms = shape.norms_per_layer
    elements = (
        norms * d  # each norm's output (the projections' LoRA input)
        + 2 * q + 2 * q  # q after RoPE and the attention output; k and v repeated to every head (padding)
        + shape.heads + work.max_length  # the attention's log-sum-exp and its float mask row
        + 4 * i  # gate, act(gate), up, act(gate)·up
        + len(work.targets) * work.lora_r  # the LoRA intermediates A·x
    )
    dropout = (5 * d + q + i) * (act + 1) if work.lora_dropout > 0 else 0  # dropped copies and their masks
    return elements * act + norms * d * 4 + dropout  # norms keep their input in float32


def peak_gb(parts: dict[str, float]) -> float:
    return sum(parts.values()) / GB


def plan(shape: ModelShape, work: Workload, device: Device, quantization: str = "auto") -> MemoryPlan:
    """The first configuration of the ladder that fits `device.usable_gb`.

    Raises CommonsError, one line: "needs X GB, Y GB free: ..." (X is the free memory at which the
    cheapest allowed configuration would fit), or an unknown `quantization`."""
    allowed = AUTO_LADDER if quantization == "auto" else (quantization,)
    if quantization == "auto" and device.kind == "mps":
        allowed = ("none",)  # bitsandbytes has no Apple GPU kernels
    if quantization != "auto" and quantization not in QUANTIZATIONS:
        raise CommonsError(_unknown(quantization))
    if work.batch_size < 1 or work.max_length < 1:
        raise CommonsError("batch_size and max_length must each be at least 1")
    for quant in allowed:
        for checkpointing in (False, True):
            for micro in _divisors_descending(work.batch_size):
                parts = estimate(shape, work, quant, device.dtype, checkpointing, micro)
                if peak_gb(parts) <= device.usable_gb:
                    return MemoryPlan(
                        quantization=quant, dtype=device.dtype, gradient_checkpointing=checkpointing,
                        micro_batch=micro, accumulation=work.batch_size // micro,
                        predicted_peak_gb=round(peak_gb(parts), 3), usable_gb=round(device.usable_gb, 3),
                        parts_gb={k: round(v / GB, 3) for k, v in parts.items()},
                    )
    raise CommonsError(_refusal(shape, work, device, allowed[-1]))


def _refusal(shape: ModelShape, work: Workload, device: Device, quant: str) -> str:
    smallest = peak_gb(estimate(shape, work, quant, device.dtype, True, 1))
    needs = (smallest + SAFETY_GB) / (1 - SAFETY_FRACTION)
    where = "GPU memory" if device.kind == "cuda" else "RAM"
    name = f"{shape.name} " if shape.name else ""
    return (f"needs {needs:.1f} GB, {device.free_gb:.1f} GB free: {name}in {quant} with gradient "
            f"checkpointing and micro-batch 1 × {work.max_length} tokens peaks at {smallest:.1f} GB plus "
            f"the safety margin; free {where}, lower max_length, or use a machine with more memory")


def _unknown(quantization: str) -> str:
    return f"quantization {quantization!r} is unknown: use one of auto, {', '.join(QUANTIZATIONS)}"


def lowest_first_layer(shape: ModelShape, work: Workload, device: Device,
                       quantization: str = "auto") -> int | None:
    """The lowest layer a span on `device` may start at (a span starting higher keeps fewer layers'
    activations), or None when even the top layer alone does not fit."""
    for first in range(shape.layers):
        try:
            plan(shape, Workload(**{**asdict(work), "first_layer": first}), device, quantization)
        except CommonsError:
            continue
        return first
    return None


def lowest_layer(keys: list[str] | None) -> int:
    """The lowest transformer layer among LoRA state-dict keys (0 for none: the whole adapter)."""
    found = [int(m.group(1)) for k in keys or [] if (m := _LAYER.search(k))]
    return min(found) if found else 0


def _divisors_descending(n: int) -> list[int]:
    return [m for m in range(n, 0, -1) if n % m == 0]
