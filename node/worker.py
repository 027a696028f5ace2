"""What a volunteer does with one instruction from the coordinator; Flower-free so it is tested directly."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node import hardware, idle, resume
from node.data import local_examples, training_records
from node.train import TrainConfig, train
from protocol.keys import Identity
from protocol.lora import set_state, wrap
from protocol.models import load_base
from protocol.update import encode, update_digest, wire_bytes

log = logging.getLogger("commons.node")
_MODELS: dict[str, Any] = {}  # one wrapped model per (base, revision, lora) for the life of the process


@dataclass
class NodeSettings:
    home: Path
    data: Path
    threads: int | None = None
    max_vram_gb: float | None = None
    idle_only: bool = False

    @property
    def identity(self) -> Identity:
        return Identity.load_or_create(self.home / "identity" / "ed25519.key")


def status(settings: NodeSettings, **fields: Any) -> None:
    """The live status line `commons node start` shows, written where any process can read it."""
    path = settings.home / "status.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"time": time.time(), **fields}))
    tmp.replace(path)


def query(settings: NodeSettings) -> dict:
    identity = settings.identity
    return {
        "public_key": identity.public_hex,
        "peer_id": identity.peer_id(),
        "capability": json.dumps(hardware.detect(settings.max_vram_gb, settings.threads)),
        "examples": local_examples(settings),
    }


def _model(config: dict) -> Any:
    key = json.dumps([config["base_model"], config["base_revision"], config["lora"]], sort_keys=True)
    if key not in _MODELS:
        device, dtype = hardware.train_placement()
        base, tokenizer = load_base(config["base_model"], config["base_revision"], dtype=dtype, device=device)
        _MODELS.clear()  # one campaign at a time: free the last model first
        _MODELS[key] = (wrap(base, json.loads(config["lora"])), tokenizer)
    return _MODELS[key]


def train_round(settings: NodeSettings, config: dict, tensors: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """Train this node's shard from the global weights; returns (wire arrays, metrics, signed proof).

    `tensors` is the whole global adapter (the forward pass needs every layer); `config["keys"]` names
    the shard this node trains and sends back, encoded as `config["upload_dtype"]` asks."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    round_ = int(config["round"])
    model, tokenizer = _model(config)
    set_state(model, tensors)
    keys = json.loads(config["keys"]) if config.get("keys") else sorted(tensors)
    unknown = sorted(set(keys) - set(tensors))
    if unknown:
        raise ValueError(f"the coordinator asked to train {unknown[0]}, which it did not send")
    records = training_records(settings, config)
    steps = int(config["steps"])
    log.info("round %d: training %d steps on %d local records", round_, steps, len(records))
    checkpoint = resume.open_checkpoint(settings.home, config, tensors, records)
    if checkpoint.step:
        log.info("round %d: resuming at step %d of %d from checkpoint", round_, checkpoint.step, steps)
        status(settings, state="resuming", round=round_, step=checkpoint.step, steps=steps, resumed_from=checkpoint.step)

    gate = idle.gate_from_env() if settings.idle_only else None

    def on_pause(why: str) -> None:
        log.info("round %d: paused (--idle-only): %s", round_, why)
        status(settings, state="paused", round=round_, reason=why)

    if gate is not None:  # a fresh sample first: a busy machine should not even start the round
        gate.check(on_pause, fresh=True)

    def on_step(step: int, loss: float, tps: float) -> None:
        status(settings, state="training", round=round_, step=step, steps=steps, loss=round(loss, 4), tokens_per_s=round(tps, 1),
               resumed_from=checkpoint.step)
        if gate is not None and step < steps:
            gate.check(on_pause)

    cfg = TrainConfig(
        steps=steps, batch_size=int(config["batch_size"]), lr=float(config["lr"]),
        max_length=int(config["max_length"]), seed=int(config.get("seed", 0)) + round_,
    )
    result = train(model, tokenizer, records, cfg, keys=keys, on_step=on_step, checkpoint=checkpoint)
    wire = encode(result.state, {k: tensors[k] for k in keys}, str(config.get("upload_dtype", "fp32")))
    identity = settings.identity
    digest = update_digest(config["campaign"], round_, wire)
    proof = {"public_key": identity.public_hex, "signature": identity.sign(digest).hex()}
    checkpoint.remove()  # the update is complete and signed: Flower sends it from here
    metrics = {
        "num_examples": result.num_examples, "tokens": result.tokens, "loss": result.loss,
        "seconds": result.seconds, "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
        "upload_bytes": wire_bytes(wire), "resumed_from": result.resumed_from,
    }
    status(settings, state="sent", round=round_, loss=round(result.loss, 4), tokens_per_s=round(metrics["tokens_per_s"], 1))
    log.info("round %d: done, loss %.4f, %.0f tokens/s", round_, result.loss, metrics["tokens_per_s"])
    return wire, metrics, proof
