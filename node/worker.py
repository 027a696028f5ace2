"""What a volunteer does with one instruction from the coordinator; Flower-free so it is tested directly."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from modeling.load import DEFAULT_TARGETS, load_base, model_config
from modeling.lora import set_state, wrap
from modeling.memory import Device, MemoryPlan, ModelShape, Workload, lowest_layer, plan
from modeling.quantization import TrainedAs
from node import hardware, idle, limits, resume
from node.data import local_examples, training_records
from node.settings import NodeSettings
from node.train import TrainConfig, train
from protocol.instruction import Capability, NodeInfo, TrainInstruction
from protocol.update import encode, update_digest, wire_bytes

log = logging.getLogger("commons.node")
_MODELS: dict[str, Any] = {}  # one wrapped model per (base, revision, lora) for the life of the process


@dataclass
class KeptOptimizer:
    """A volunteer's AdamW state between rounds, kept with the warm model. Only a later round of the same
    campaign on the same keys goes on from it (the inner optimizer of DiLoCo: restarting Adam every round
    takes full-size first steps again and loses what its moments learned); anything else starts afresh."""

    campaign: str
    keys: tuple[str, ...]
    round: int
    state: dict

    def fits(self, instruction: TrainInstruction, keys: list[str]) -> bool:
        return (self.campaign == instruction.campaign and self.keys == tuple(keys)
                and instruction.round > self.round)


_OPTIMIZERS: dict[str, KeptOptimizer] = {}  # by node home: in tests and benches volunteers share a process


def forget_optimizers() -> None:
    """Drop every kept AdamW state: the next round of any campaign starts its optimizer afresh."""
    _OPTIMIZERS.clear()


def status(settings: NodeSettings, **fields: Any) -> None:
    """The live status line `commons node start` shows, written where any process can read it."""
    path = settings.home / "status.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"time": time.time(), **fields}))
    tmp.replace(path)


def first_update(settings: NodeSettings) -> float | None:
    """Seconds from `commons node start` to this volunteer's first update sent since then (kept in its home
    across rounds and runner restarts); None when the start time is unknown."""
    if not settings.started:
        return None
    path = settings.home / "node" / "joined.json"
    try:
        kept = json.loads(path.read_text())
        if kept.get("started") == settings.started:
            return float(kept["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    seconds = round(time.time() - settings.started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started": settings.started, "seconds": seconds}))
    return seconds


def query(settings: NodeSettings) -> NodeInfo:
    """Who this node is and what it can give, for the coordinator's plan."""
    identity = settings.identity
    capability = Capability.from_report(hardware.detect(settings.max_vram_gb, settings.threads))
    return NodeInfo(public_key=identity.public_hex, peer_id=identity.peer_id(), capability=capability,
                    examples=local_examples(settings))


def _memory_plan(settings: NodeSettings, instruction: TrainInstruction) -> MemoryPlan:
    """This round's plan on this machine (modeling/memory.py), before any weight is loaded. A warm model's
    own weights count as free: it is dropped if the plan wants another precision.

    Raises CommonsError ("needs 6.1 GB, 4.0 GB free: …") for a round this machine cannot finish."""
    lora = instruction.lora
    keys = list(instruction.keys) if instruction.keys is not None else None
    work = Workload(batch_size=instruction.batch_size, max_length=instruction.max_length,
                    lora_r=int(lora.get("r", 8)), lora_dropout=float(lora.get("dropout", 0.0)),
                    targets=tuple(lora.get("target_modules", DEFAULT_TARGETS)),
                    first_layer=lowest_layer(keys))
    shape = ModelShape.from_config(model_config(instruction.base_model, instruction.base_revision),
                                   name=instruction.base_model)
    device = Device.from_capability(hardware.detect(settings.max_vram_gb, settings.threads))
    warm = sum(p.numel() * p.element_size() for model, _ in _MODELS.values() for p in model.parameters())
    device = replace(device, free_gb=device.free_gb + warm / 2**30)
    return plan(shape, work, device, instruction.quantization)


def _model(settings: NodeSettings, instruction: TrainInstruction) -> tuple[Any, Any, MemoryPlan]:
    """The wrapped model for this round, in the precision its memory plan chose, and that plan."""
    memory = _memory_plan(settings, instruction)
    lora = json.dumps(instruction.lora, sort_keys=True)
    key = json.dumps([instruction.base_model, instruction.base_revision, lora, memory.quantization])
    if key not in _MODELS:
        _MODELS.clear()  # one campaign at a time: free the last model first
        forget_optimizers()
        device, dtype = hardware.train_placement()
        base, tokenizer = load_base(instruction.base_model, instruction.base_revision, dtype=dtype,
                                    device=device, quantization=memory.quantization)
        _MODELS[key] = (wrap(base, dict(instruction.lora)), tokenizer)
    model, tokenizer = _MODELS[key]
    return model, tokenizer, memory


def train_round(settings: NodeSettings, instruction: TrainInstruction,
                tensors: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """Train this node's shard from the global weights; returns (wire arrays, metrics, signed proof).

    `tensors` is the whole global adapter (the forward pass needs every layer); `instruction.keys` names
    the shard this node trains and sends back, encoded as `instruction.upload_dtype` asks."""
    import torch

    limits.check(instruction, limits.read(settings.home))  # data, not code: only what this volunteer allows
    if settings.threads:
        torch.set_num_threads(settings.threads)
    round_ = instruction.round
    started = time.monotonic()
    model, tokenizer, memory = _model(settings, instruction)
    load_seconds = time.monotonic() - started  # ~0 when the runner kept the model warm from the last round
    set_state(model, tensors)
    keys = list(instruction.keys) if instruction.keys is not None else sorted(tensors)
    unknown = sorted(set(keys) - set(tensors))
    if unknown:
        raise ValueError(f"the coordinator asked to train {unknown[0]}, which it did not send")
    records = training_records(settings, instruction)
    steps = instruction.steps
    log.info("round %d: training %d steps on %d local records", round_, steps, len(records))
    checkpoint = resume.open_checkpoint(settings.home, instruction, tensors, records)
    if checkpoint.step:
        log.info("round %d: resuming at step %d of %d from checkpoint", round_, checkpoint.step, steps)
        status(settings, state="resuming", round=round_, step=checkpoint.step, steps=steps,
               resumed_from=checkpoint.step)

    gate = idle.gate_from_env() if settings.idle_only else None

    def on_pause(why: str) -> None:
        log.info("round %d: paused (--idle-only): %s", round_, why)
        status(settings, state="paused", round=round_, reason=why)

    if gate is not None:  # a fresh sample first: a busy machine should not even start the round
        gate.check(on_pause, fresh=True)

    def on_step(step: int, loss: float, tps: float) -> None:
        status(settings, state="training", round=round_, step=step, steps=steps, loss=round(loss, 4),
               tokens_per_s=round(tps, 1), resumed_from=checkpoint.step)
        if gate is not None and step < steps:
            gate.check(on_pause)

    # the campaign's batch, cut into the micro-batches this machine's memory plan allows
    cfg = TrainConfig(
        steps=steps, batch_size=instruction.batch_size, lr=instruction.lr, max_length=instruction.max_length,
        seed=instruction.seed + round_, micro_batch=memory.micro_batch,
        gradient_checkpointing=memory.gradient_checkpointing,
    )
    kept = _OPTIMIZERS.get(str(settings.home))
    state = kept.state if kept and kept.fits(instruction, keys) else None
    result = train(model, tokenizer, records, cfg, keys=keys, on_step=on_step, checkpoint=checkpoint,
                   optimizer_state=state)
    kept = KeptOptimizer(instruction.campaign, tuple(keys), round_, result.optimizer_state)
    _OPTIMIZERS[str(settings.home)] = kept
    wire = encode(result.state, {k: tensors[k] for k in keys}, instruction.upload_dtype)
    identity = settings.identity
    digest = update_digest(instruction.campaign, round_, wire)
    proof = {"public_key": identity.public_hex, "signature": identity.sign(digest).hex()}
    checkpoint.remove()  # the update is complete and signed: Flower sends it from here
    metrics = {
        "num_examples": result.num_examples, "tokens": result.tokens, "loss": result.loss,
        "seconds": result.seconds, "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
        "upload_bytes": wire_bytes(wire), "resumed_from": result.resumed_from,
        "load_seconds": load_seconds, "task_seconds": time.monotonic() - started,
        # how it trained: the manifest's ledger records it (modeling/quantization.py), the rest is for the log
        **TrainedAs.of(model).to_metrics(), "padding": result.padding, "micro_batch": memory.micro_batch,
        "accumulation": memory.accumulation, "gradient_checkpointing": int(memory.gradient_checkpointing),
        "predicted_peak_gb": memory.predicted_peak_gb,
        "started": settings.started,  # when `commons node start` ran: the coordinator's join time
    }
    status(settings, state="sent", round=round_, loss=round(result.loss, 4),
           tokens_per_s=round(metrics["tokens_per_s"], 1), joined_s=first_update(settings))
    log.info("round %d: done, loss %.4f, %.0f tokens/s", round_, result.loss, metrics["tokens_per_s"])
    return wire, metrics, proof
