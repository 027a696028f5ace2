"""Per-round checkpoint: the global adapter (safetensors) and the round state (JSON), written atomically.

Weights go to a file named for their round and the state file, replaced last, names that file: a crash at
any point leaves a state that points at complete weights of the same round. The best evaluated round's
weights (what gets published) are kept the same way, in `best-R.safetensors`, named by `state["best"]`.
The weights file also holds what the aggregation rule carries across rounds (`rules.Carry.checkpoint`:
the exact rule's residual as `residual.*` arrays).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

STATE = "state.json"


def save(folder: Path, tensors: dict[str, np.ndarray], state: dict, best: bool = False) -> dict:
    """Write this round; with `best`, these weights also become the best round's. Returns the state saved."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = f"global-{state['round']}.safetensors"
    _write(folder, weights, tensors)
    state = {**state, "weights": weights}
    if best:
        state["best"] = {**state.get("best", {}), "round": state["round"],
                         "weights": f"best-{state['round']}.safetensors"}
        _write(folder, state["best"]["weights"], tensors)
    tmp_state = folder / f".{STATE}.tmp"
    tmp_state.write_text(json.dumps(state, indent=1))
    os.replace(tmp_state, folder / STATE)
    keep = {weights, state.get("best", {}).get("weights")}
    for old in [*folder.glob("global-*.safetensors"), *folder.glob("best-*.safetensors")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return state


def _write(folder: Path, name: str, tensors: dict[str, np.ndarray]) -> None:
    tmp = folder / f".{name}.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / name)


def load_best(folder: Path, state: dict) -> dict[str, np.ndarray] | None:
    """The best evaluated round's weights, as `state` names them (None before any round)."""
    name = state.get("best", {}).get("weights")
    return load_file(str(folder / name)) if name else None


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
