"""Flower ClientApp: the SuperNode runs this for every instruction; the work is in node.worker."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from node import worker
from node.settings import NodeSettings
from protocol.instruction import TrainInstruction
from protocol.packed import pack, unpack

app = ClientApp()
STARTED = time.time()  # the runner's start: a volunteer's start when its SuperNode's config does not say


def _settings(context: Context) -> NodeSettings:
    cfg = context.node_config
    home = Path(str(cfg.get("home") or Path.home() / ".commons"))
    logging.basicConfig(
        filename=home / "logs" / "node.log" if (home / "logs").is_dir() else None,
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    threads = int(cfg.get("threads", 0)) or None
    max_vram = float(cfg.get("max_vram", 0)) or None
    data = Path(str(cfg.get("data", home / "data" / "train.jsonl")))
    return NodeSettings(home=home, data=data, threads=threads, max_vram_gb=max_vram,
                        idle_only=bool(cfg.get("idle_only", False)),
                        started=float(cfg.get("started", 0)) or STARTED)


@app.query()
def query(msg: Message, context: Context) -> Message:
    info = worker.query(_settings(context))
    return Message(RecordDict({"info": ConfigRecord(info.to_config())}), reply_to=msg)


@app.query("ended")
def ended(msg: Message, context: Context) -> Message:
    """The coordinator's word that its campaign is over: the status line says how it ended."""
    config = msg.content["config"]
    worker.status(_settings(context), state="ended", campaign=str(config.get("campaign", "")),
                  outcome=str(config.get("outcome", ""))[:300])
    return Message(RecordDict({}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = _settings(context)
    instruction = TrainInstruction.from_config(dict(msg.content["config"]))
    tensors = unpack({k: v.numpy() for k, v in msg.content["adapter"].items()})
    wire, metrics, proof = worker.train_round(settings, instruction, tensors)
    content = RecordDict(
        {
            "adapter": ArrayRecord({k: Array(v) for k, v in pack(wire).items()}),
            "metrics": MetricRecord(metrics),
            "proof": ConfigRecord(proof),
        }
    )
    return Message(content, reply_to=msg)
