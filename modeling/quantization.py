"""Quantized base models (QLoRA): how each precision is loaded, and how a node says which one it trained on.

    >>> kwargs = from_pretrained_kwargs("nf4", torch.bfloat16, "cuda")   # node: load the base in 4 bits
    >>> trained = TrainedAs.of(model)                                     # node: TrainedAs('nf4', 'bfloat16')
    >>> metrics.update(trained.to_metrics())                              # into the round's reply
    >>> TrainedAs.from_metrics(reply_metrics).label()                     # coordinator: "nf4/bfloat16"
    >>> TrainedAs.of(coordinator_model).label()                           # its evaluation: "float32"

A variant is one function in LOADERS. nf4 and int8 go through bitsandbytes (`BitsAndBytesConfig`; 0.50
runs 4-bit on CPU too, slowly); `modeling.lora.wrap` then calls `peft.prepare_model_for_kbit_training`.
Only the frozen base is quantized: LoRA weights stay float32, so the adapter a campaign publishes is a
plain PEFT adapter that loads on the unquantized base.

Flower's MetricRecord carries numbers only, so the reply says it in bits: `base_bits` 4 (nf4), 8 (int8),
16 or 32 (unquantized bf16 / fp32 weights) and `compute_bits` 16 or 32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.errors import CommonsError

_BITS = {"nf4": 4, "int8": 8}
_DTYPE_BITS = {"bfloat16": 16, "float16": 16, "float32": 32}


def _none(dtype: Any, device: str) -> dict[str, Any]:
    return {}


def _nf4(dtype: Any, device: str) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                bnb_4bit_use_double_quant=True)
    return {"quantization_config": config, "device_map": {"": device}}


def _int8(dtype: Any, device: str) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device}}


LOADERS: dict[str, Callable[[Any, str], dict[str, Any]]] = {"none": _none, "nf4": _nf4, "int8": _int8}


def from_pretrained_kwargs(quantization: str, dtype: Any, device: str) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for a precision; bitsandbytes places the weights itself."""
    if quantization not in LOADERS:
        raise CommonsError(f"quantization {quantization!r} is unknown: use one of {', '.join(LOADERS)}")
    return LOADERS[quantization](dtype, device)


def _bnb_layers(model: Any) -> list[Any]:
    """bitsandbytes' own linear layers (PEFT's LoRA wrappers around them share the class names)."""
    return [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")
            and type(m).__name__ in ("Linear4bit", "Linear8bitLt")]


def quantization_of(model: Any) -> str:
    """"nf4", "int8" or "none", from the layer types bitsandbytes put in (no bitsandbytes import)."""
    layers = _bnb_layers(model)
    if not layers:
        return "none"
    return "nf4" if type(layers[0]).__name__ == "Linear4bit" else "int8"


@dataclass(frozen=True)
class TrainedAs:
    """How a base model was held while training or evaluating: its quantization and compute dtype."""

    quantization: str  # none | nf4 | int8
    dtype: str  # bfloat16 | float32

    @classmethod
    def of(cls, model: Any) -> TrainedAs:
        quantization = quantization_of(model)
        if quantization == "nf4":
            dtype = _bnb_layers(model)[0].compute_dtype
        else:  # int8 matmuls run in float16 inside bitsandbytes; what surrounds them is float32
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        return cls(quantization, str(dtype).removeprefix("torch."))

    def label(self) -> str:
        """"float32", "bfloat16", or the quantization and compute dtype: "nf4/bfloat16"."""
        return self.dtype if self.quantization == "none" else f"{self.quantization}/{self.dtype}"

    def to_metrics(self) -> dict[str, int]:
        base = _BITS.get(self.quantization) or _DTYPE_BITS.get(self.dtype, 32)
        return {"base_bits": base, "compute_bits": _DTYPE_BITS.get(self.dtype, 32)}

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> TrainedAs | None:
        """None for a reply without the fields (an older node)."""
        try:
            base, compute = int(metrics["base_bits"]), int(metrics["compute_bits"])
        except (KeyError, TypeError, ValueError):
            return None
        quantization = {4: "nf4", 8: "int8"}.get(base, "none")
        return cls(quantization, "bfloat16" if compute == 16 else "float32")
