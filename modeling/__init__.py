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
