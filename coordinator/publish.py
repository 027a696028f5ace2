"""Turn the final global adapter into a signed, content-addressed PEFT folder (published through
protocol.publishing, the one path `commons publish` takes too)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from coordinator.campaign import Campaign
from modeling.quantization import TrainedAs

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

or with PEFT directly, from the pulled folder, on the exact base it was trained on
(`{base_revision}`; `commons base path {base_model}` prints the folder holding it):

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_model = AutoModelForCausalLM.from_pretrained("BASE_FOLDER")  # what `commons base path` printed
model = PeftModel.from_pretrained(base_model, "ADAPTER_FOLDER")  # what `commons pull {name}` printed
```

Every file is listed with its sha256 in `model.sig` (an OpenSSF model_signing v1.0 statement in a DSSE
envelope, ed25519); `commons verify` checks it.
"""


def write_adapter(
    model: Any, folder: Path, campaign: Campaign, eval_result: dict, n_contributors: int,
    base_revision: str = ""
) -> Path:
    """adapter_config.json + adapter_model.safetensors (PEFT's own writer) + a model card.

    `base_revision` pins the base exactly (modeling.load.exact_revision): a Hub commit goes into
    adapter_config.json's `revision`; a local conversion ("sha256:...") has no Hub revision, so none is
    written there (PEFT would ask the Hub for it) and the manifest carries the hash."""
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = campaign.base_model
    revision = base_revision or campaign.base_revision
    config["revision"] = None if revision.startswith("sha256:") else revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(
        CARD.format(
            name=campaign.name,
            base_model=campaign.base_model,
            license_lower=campaign.published_license().lower(),
            base_revision=revision,
            description=campaign.description or f"Fine-tuned for: {campaign.task or campaign.name}.",
            n_contributors=n_contributors,
            rounds=eval_result.get("rounds", campaign.rounds),
            campaign=campaign.name,
            rule=campaign.aggregation,
            acc_base=eval_result["accuracy_base"],
            acc_adapter=eval_result["accuracy_adapter"],
        )
    )
    return folder


def record_training(entry: dict, metrics: dict) -> None:
    """Add to a node's contribution-ledger entry how it held the base this round ("nf4/bfloat16",
    "float32"; from its reply, modeling/quantization.py): the manifest's ledger says how each node trained."""
    trained = TrainedAs.from_metrics(metrics)
    held = entry.setdefault("trained_as", [])
    if trained is not None and trained.label() not in held:
        held.append(trained.label())
