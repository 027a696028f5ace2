"""A node's mid-round training checkpoint, so a volunteer restarted mid-round resumes where it stopped.

The file is keyed by a hash of the whole train instruction (campaign, round, the shard's exact keys, the
training config), a digest of the incoming global tensors and of the local records: it is only ever
reused for exactly the same work. It holds the shard's LoRA parameters, the optimizer state, the step,
the loss/token/example counters and the data-order and torch RNG state, so a resumed run continues
exactly as the uninterrupted one would have.

When: after a step, once `every_seconds` of training passed since the last save (default 30 s,
`$COMMONS_RESUME_SECONDS` overrides it), or every `every` steps when that is set. Time, not a step count,
because the cost that matters is wall-clock work lost against time spent writing: a save (the shard and
two Adam moments) takes well under a second even for a 1.7B model's adapter, so one per 30 s costs ~1%
and a crash loses at most 30 s plus one step. A round shorter than that is cheaper to redo than to save.

Where: `home/node/resume/<campaign digest>-r<round>-<work key>.pt`, written atomically (tmp + fsync +
replace). It is removed once the update is handed to Flower; stale files (an earlier round of the same
campaign, or any older than a day) are pruned when a round starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.instruction import TrainInstruction

EVERY_SECONDS = 30.0
STALE_SECONDS = 24 * 3600.0


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, str(array.dtype), list(array.shape)]).encode())
        h.update(array.tobytes())
    return h.hexdigest()


def work_key(instruction: TrainInstruction, tensors: dict[str, np.ndarray], records: list[dict]) -> str:
    """Equal only for the same instruction, the same global weights and the same local data."""
    h = hashlib.sha256()
    # in its wire form, which a restarted (even upgraded) node reads back the same
    h.update(json.dumps(instruction.to_config(), sort_keys=True, default=str).encode())
    h.update(tensors_digest(tensors).encode())
    h.update(hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest().encode())
    return h.hexdigest()


def _campaign_tag(campaign: str) -> str:
    return hashlib.sha256(campaign.encode()).hexdigest()[:12]


def _every_seconds() -> float:
    raw = os.environ.get("COMMONS_RESUME_SECONDS", "")
    try:
        return float(raw) if raw else EVERY_SECONDS
    except ValueError:
        return EVERY_SECONDS


@dataclass
class Checkpoint:
    """One piece of work's checkpoint file; `state` is what was loaded (None: start from step 0)."""

    path: Path
    every: int | None = None
    every_seconds: float = EVERY_SECONDS
    state: dict | None = None
    _last_step: int = 0
    _last_time: float = field(default_factory=time.monotonic)

    @property
    def step(self) -> int:
        return int(self.state["step"]) if self.state else 0

    def due(self, step: int, steps: int) -> bool:
        """Save after this step? Never after the last one: the update itself follows at once."""
        if step >= steps:
            return False
        if self.every and step - self._last_step >= self.every:
            return True
        return time.monotonic() - self._last_time >= self.every_seconds

    def save(self, state: dict) -> None:
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)
        self._last_step, self._last_time = int(state["step"]), time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".tmp").unlink(missing_ok=True)


def _load(path: Path) -> dict | None:
    """The saved state, or None when absent or unreadable (a torn file is simply not resumed from)."""
    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any corrupt file means: start the round over
        return None
    return state if isinstance(state, dict) and "step" in state else None


def prune(folder: Path, campaign_tag: str, round_: int, keep: Path) -> list[Path]:
    """Remove checkpoints no round can resume from: earlier rounds of this campaign, or older than a day."""
    removed = []
    now = time.time()
    for path in folder.iterdir() if folder.is_dir() else []:
        if path.with_suffix(".pt") == keep:
            continue
        tag, _, rest = path.name.partition("-r")
        try:
            old_round = int(rest.split("-", 1)[0])
        except ValueError:
            old_round = -1
        try:
            too_old = now - path.stat().st_mtime > STALE_SECONDS
        except OSError:
            continue
        if too_old or (tag == campaign_tag and old_round < round_):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def open_checkpoint(home: Path, instruction: TrainInstruction, tensors: dict[str, np.ndarray],
                    records: list[dict], every: int | None = None) -> Checkpoint:
    """This work's checkpoint (loaded when one exists), after pruning the stale ones."""
    folder = home / "node" / "resume"
    tag, round_ = _campaign_tag(instruction.campaign), instruction.round
    path = folder / f"{tag}-r{round_}-{work_key(instruction, tensors, records)[:32]}.pt"
    prune(folder, tag, round_, path)
    state = _load(path)
    ckpt = Checkpoint(path=path, every=every, every_seconds=_every_seconds(), state=state)
    ckpt._last_step = ckpt.step
    return ckpt


def capture(step: int, named: dict[str, Any], optimizer: Any, rng: random.Random, order: list[int],
            counters: dict[str, Any]) -> dict:
    """Everything the loop needs to continue after `step` steps exactly as if it had never stopped."""
    import torch

    state = {
        "step": step,
        "params": {name: p.detach().to("cpu", copy=True) for name, p in named.items()},
        "optimizer": optimizer.state_dict(),
        "rng": rng.getstate(),
        "order": list(order),
        "torch_rng": torch.get_rng_state(),
        "counters": dict(counters),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict, named: dict[str, Any], optimizer: Any, rng: random.Random) -> tuple[list[int], dict]:
    """Put the saved parameters, optimizer and RNG back; returns (data order left, counters)."""
    import torch

    if set(state["params"]) != set(named):
        raise ValueError("the resume checkpoint holds other parameters than this shard's")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(state["params"][name].to(param.device, param.dtype))
    optimizer.load_state_dict(state["optimizer"])
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return list(state["order"]), dict(state["counters"])
