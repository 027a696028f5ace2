"""Real signed sample entries, for seeding an index in tests, benchmarks and screenshots.

    >>> envelope, cid = make_entry(tmp / "a", AdapterMeta(name="demo-math"), Identity.generate(), store)
    >>> db.register(envelope, cid)

Each sample is a tiny directory (PEFT's adapter_config.json plus a valid, small safetensors file),
signed with `protocol.signing.manifest.sign_directory` and imported like `ipfs add -r`, so the index sees
exactly what `commons publish` would send.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from protocol.content import unixfs
from protocol.content.blockstore import BlockStore
from protocol.signing.dsse import envelope_bytes
from protocol.signing.keys import Identity
from protocol.signing.manifest import AdapterMeta, sign_directory


def tiny_safetensors(values: int = 16) -> bytes:
    """A valid safetensors file holding one float32 tensor of `values` zeros."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\0" * (4 * values)


def write_adapter_files(directory: Path, meta: AdapterMeta, weights: int = 16) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"base_model_name_or_path": meta.base_model, "peft_type": "LORA", "task_type": "CAUSAL_LM",
              **meta.lora_config}
    (directory / "adapter_config.json").write_text(json.dumps(config, sort_keys=True))
    (directory / "adapter_model.safetensors").write_bytes(tiny_safetensors(weights))


def make_entry(directory: Path, meta: AdapterMeta, identity: Identity,
               store: BlockStore | None = None) -> tuple[bytes, str]:
    """(model.sig bytes, root CID) of a freshly written and signed sample directory."""
    if not directory.exists() or not any(directory.iterdir()):
        write_adapter_files(directory, meta)
    envelope = envelope_bytes(sign_directory(directory, meta, identity))
    if store is not None:
        return envelope, store.add_path(directory)
    return envelope, unixfs.import_directory(directory)


def sample_meta(name: str, version: int = 1, **fields: object) -> AdapterMeta:
    """Plausible metadata of a federated run: eval, curve and ledger filled in."""
    rounds = int(fields.pop("rounds", 3))  # type: ignore[call-overload]
    defaults: dict = {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_revision": "main",
        "lora_config": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "campaign": "gsm8k-math", "rounds": rounds, "license": "Apache-2.0",
        "contributors": ["aa" * 32, "bb" * 32],
        "datasets": [{"cid": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", "name": "gsm8k",
                      "license": "MIT"}],
        "eval": {"task": "gsm8k", "accuracy_base": 0.21, "accuracy_adapter": 0.34,
                 "curve": [{"round": r, "loss": round(2.0 / (r + 1), 4),
                            "accuracy": round(0.21 + 0.04 * r, 4)}
                           for r in range(rounds + 1)]},
        "ledger": [{"node": "aa" * 32, "rounds": rounds, "tokens": 120_000 * rounds},
                   {"node": "bb" * 32, "rounds": max(1, rounds - 1), "tokens": 80_000 * rounds}],
    }
    defaults.update(fields)
    return AdapterMeta(name=name, version=version, **defaults)
