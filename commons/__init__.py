"""CLI and the Python API for developers."""


def load_adapter(base_model: str, adapter: str, index_url: str | None = None):
    """A `PeftModel`: `adapter` is a pulled folder, a CID or NAME[@VERSION] (pulled and verified first)."""
    from pathlib import Path

    from peft import PeftModel

    from modeling.load import load_base

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        from commons.pull import pull

        folder = pull(adapter, index_url=index_url, progress=False).path
    model, tokenizer = load_base(base_model)
    peft_model = PeftModel.from_pretrained(model, str(folder))
    peft_model.tokenizer = tokenizer  # so callers can chat right away
    return peft_model
