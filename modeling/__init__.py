"""Base models and LoRA: loading, quantizing, wrapping, and how much memory a round needs.

Shared by node/ (which trains) and coordinator/ (which evaluates and plans); protocol/ never imports it.
torch, transformers and peft are imported inside functions, so importing this package stays cheap.

    load.py          a base-model id or folder → (model, tokenizer): Hub ids, local folders, the offline
                     SmolLM2 GGUF and the tiny random-init test model (`load_base`, `model_config`)
    quantization.py  how each base precision loads (none | nf4 | int8 via bitsandbytes) and how a node
                     says which one it trained on (`from_pretrained_kwargs`, `TrainedAs`)
    lora.py          wrap a base with LoRA (`wrap`) and move adapter state as numpy (`get_state`, `set_state`)
    memory.py        a model's memory needs from its config.json alone and the plan that fits a machine
                     (`ModelShape`, `Device`, `Workload`, `plan`)

Main path on a node: `plan(...)` → `load_base(id, quantization=...)` → `wrap(base, spec)` → train →
`get_state(model)`. A new quantized loader is one function in `quantization.py` plus one line in
its `LOADERS` registry.
"""

import logging


class _NoRemoteKernelNotice(logging.Filter):
    """bitsandbytes' CPU backend tries a kernel from the Hub's kernels-community and warns when that is
    refused. A volunteer runs only installed code, so the refusal is what we want and the warning is noise:
    its own kernel does the work."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


# before anything imports bitsandbytes: it tries the remote kernel once, at import
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoRemoteKernelNotice())
