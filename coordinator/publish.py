"""Turn the final global adapter into a signed, content-addressed PEFT folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from coordinator.campaign import Campaign
from protocol.blockstore import BlockStore
from protocol.keys import Identity
from protocol.manifest import AdapterMeta, sign_directory

CARD = """---
base_model: {base_model}
library_name: peft
license: {license_lower}
tags: [lora, lora-commons, federated]
---
# {name}

{description}

A LoRA adapter for `{base_model}` trained by {n_contributors} volunteers of LoRA Commons in
{rounds} federated rounds (campaign `{campaign}`, aggregation `{rule}`).

| held-out exact match | score |
|---|---|
| base model | {acc_base:.1%} |
| with this adapter | {acc_adapter:.1%} |

## Use

```bash
commons pull {name}
```

```python
from commons import load_adapter
model = load_adapter("{base_model}", "{name}")
```

or with PEFT directly, from the pulled folder:

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "path/to/{name}")
```

Every file is listed with its sha256 in `model.sig` (an OpenSSF model_signing v1.0 statement in a DSSE
envelope, ed25519); `commons verify` checks it.
"""


def write_adapter(
    model: Any, folder: Path, campaign: Campaign, eval_result: dict, n_contributors: int
) -> Path:
    """adapter_config.json + adapter_model.safetensors (PEFT's own writer) + a model card."""
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = campaign.base_model
    config["revision"] = campaign.base_revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(
        CARD.format(
            name=campaign.name,
            base_model=campaign.base_model,
            license_lower=campaign.license.lower(),
            description=campaign.description or f"Fine-tuned for: {campaign.task or campaign.name}.",
            n_contributors=n_contributors,
            rounds=campaign.rounds,
            campaign=campaign.name,
            rule=campaign.aggregation,
            acc_base=eval_result["accuracy_base"],
            acc_adapter=eval_result["accuracy_adapter"],
        )
    )
    return folder


def sign_and_store(
    folder: Path, meta: AdapterMeta, identity: Identity, store: BlockStore | None = None
) -> tuple[str, dict]:
    """Sign the folder (model.sig), add it to the block store; returns (root CID, envelope)."""
    envelope = sign_directory(folder, meta, identity)
    cid = (store or BlockStore()).add_path(folder)
    return cid, envelope
