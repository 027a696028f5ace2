"""Per-round checkpoint: the global adapter (safetensors) and the round state (JSON), written atomically.

Weights go to a file named for their round and the state file, replaced last, names that file: a crash at
any point leaves a state that points at complete weights of the same round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

STATE = "state.json"


def save(folder: Path, tensors: dict[str, np.ndarray], state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights = f"global-{state['round']}.safetensors"
    tmp = folder / f".{weights}.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / weights)
    tmp_state = folder / f".{STATE}.tmp"
    tmp_state.write_text(json.dumps({**state, "weights": weights}, indent=1))
    os.replace(tmp_state, folder / STATE)
    for old in folder.glob("global-*.safetensors"):
        if old.name != weights:
            old.unlink(missing_ok=True)


def load(folder: Path, fingerprint: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """The last completed round of this very campaign, or None to start fresh."""
    try:
        state = json.loads((folder / STATE).read_text())
        tensors = load_file(str(folder / state["weights"]))
    except (OSError, ValueError, KeyError):
        return None
    if state.get("fingerprint") != fingerprint:
        return None
    return tensors, state
