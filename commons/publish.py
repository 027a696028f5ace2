"""What `commons publish` signs about a PEFT folder: its manifest metadata, read from adapter_config.json.

    >>> meta = meta_from_folder(folder, name, "MIT")
    >>> published = publish(folder, meta, IndexDB())  # protocol.publishing: version, sign, store, register
"""

from __future__ import annotations

import json
from pathlib import Path

from protocol.errors import CommonsError
from protocol.signing.manifest import AdapterMeta


def meta_from_folder(folder: Path, name: str, license: str, **extra) -> AdapterMeta:
    config_file = folder / "adapter_config.json"
    base_model, revision, lora = "", "", {}
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except ValueError:
            raise CommonsError(f"{config_file} is not valid JSON; re-save the adapter with PEFT") from None
        base_model = config.get("base_model_name_or_path") or ""
        revision = config.get("revision") or ""
        lora = {k: config[k] for k in ("r", "lora_alpha", "target_modules", "lora_dropout") if k in config}
        if isinstance(lora.get("target_modules"), list):
            lora["target_modules"] = sorted(lora["target_modules"])
    elif extra.get("kind", "adapter") == "adapter":
        raise CommonsError(f"{folder} has no adapter_config.json: publish a PEFT adapter folder")
    return AdapterMeta(name=name, license=license, base_model=base_model, base_revision=revision,
                       lora_config=lora, **extra)

