"""LoRA wrapping and the adapter state as numpy arrays, shared by nodes and the coordinator.

torch and peft are imported inside the functions: importing `protocol` stays light.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modeling.load import DEFAULT_TARGETS


def lora_config(spec: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=int(spec.get("r", 8)),
        lora_alpha=int(spec.get("alpha", spec.get("lora_alpha", 16))),
        lora_dropout=float(spec.get("dropout", 0.0)),
        target_modules=list(spec.get("target_modules", DEFAULT_TARGETS)),
        task_type="CAUSAL_LM",
    )


def wrap(base: Any, spec: dict[str, Any]) -> Any:
    """The base model with fresh LoRA weights; PEFT's init (B = 0) means it starts equal to the base.

    A quantized base (nf4/int8) first goes through `prepare_model_for_kbit_training`: frozen, what is left
    unquantized in float32. Checkpointing is not switched on here: node/train.py sets it per round."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    from modeling.quantization import quantization_of

    if quantization_of(base) != "none":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    torch.manual_seed(int(spec.get("seed", 0)))  # every node must start from the same A
    return get_peft_model(base, lora_config(spec))


def get_state(model: Any, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    import torch
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    wanted = keys if keys is not None else sorted(state)
    return {k: state[k].detach().to(torch.float32).cpu().numpy().copy() for k in wanted}


def set_state(model: Any, state: dict[str, np.ndarray]) -> None:
    import torch
    from peft import set_peft_model_state_dict

    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in state.items()}
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter has {len(unexpected)} keys this model lacks, e.g. {unexpected[0]}")
