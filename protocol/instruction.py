"""What the coordinator tells a node to train, and what a node says it can do: two ConfigRecords, typed.

    >>> record = ConfigRecord(instruction.to_config())                   # coordinator: coordinator/rounds.py
    >>> instruction = TrainInstruction.from_config(dict(msg.content["config"]))   # node: node/client_app.py
    >>> record = ConfigRecord(NodeInfo(public_key=key, capability=Capability.from_report(
    ...     hardware.detect()), examples=12).to_config())                # node: its answer to the query
    >>> info = NodeInfo.from_config(dict(reply.content["info"]))         # coordinator: plans from it
    >>> info.capability.to_report()    # the dict coordinator/plan.py and modeling.memory.Device read

A ConfigRecord holds flat scalars, so the nested parts travel as JSON strings: the LoRA settings, the
shard's keys and the campaign's dataset CIDs in the instruction, the hardware in the capability report.
The wire is what coordinators and nodes have always exchanged: a key a side does not know is ignored,
one an older peer leaves out takes the default it always had, and a value of the wrong type is refused
with CommonsError, one line naming the key. Whether a value is acceptable (a rank this volunteer allows,
a base model that is not a local path) is the node's own judgement, in node/limits.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from protocol.errors import CommonsError

DATA_MODES = ("local", "campaign")  # the node's own file | its slice of the campaign's datasets
DEVICES = ("cuda", "mps", "cpu")
_SAME_VERSION = "run the same lora-commons version on coordinator and node"
_ABSENT = object()

# What a value must be, and how an error names it.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "number": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}


class _Reader:
    """Typed reads of one record; every error is one line naming the record, the key and the fix."""

    def __init__(self, record: Mapping[str, Any], what: str, fix: str) -> None:
        self.record, self.what, self.fix = record, what, fix

    def get(self, key: str, kind: str, default: Any = _ABSENT) -> Any:
        """record[key] when it is of `kind`; `default` when it is absent (or null); else CommonsError."""
        value = self.record.get(key)
        if value is None:
            if default is _ABSENT:
                raise CommonsError(f"{self.what} has no {key}: {self.fix}")
            return default
        test, name = _KINDS[kind]
        if not test(value):
            self.wrong(key, value, name)
        return float(value) if kind == "number" else value

    def json(self, key: str, shape: type, name: str, default: Any = _ABSENT) -> Any:
        """The JSON string at `key`, decoded to a `shape` (dict or list); an empty string is absent."""
        optional = default is not _ABSENT
        text = self.get(key, "str", "" if optional else _ABSENT)
        if text == "" and optional:
            return default
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, shape):
            self.wrong(key, text, name)
        return value

    def strings(self, key: str, default: Any = _ABSENT) -> Any:
        """A JSON list of strings, as a tuple."""
        value = self.json(key, list, "a JSON list of strings", default)
        if value is default:
            return value
        if not all(isinstance(x, str) for x in value):
            self.wrong(key, self.record[key], "a JSON list of strings")
        return tuple(value)

    def wrong(self, key: str, value: Any, name: str) -> None:
        raise CommonsError(f"{self.what} has {key} = {repr(value)[:80]}, not {name}: {self.fix}")


@dataclass(frozen=True, kw_only=True)
class TrainInstruction:
    """One round's work for one node: the `config` ConfigRecord of a Flower `train` message.

    The coordinator builds it from the campaign (coordinator.rounds.train_instruction); the node reads it
    in node/client_app.py, checks it against its volunteer's bounds (node.limits.check) and trains it
    (node.worker.train_round). Fields are in wire order."""

    campaign: str
    round: int
    base_model: str  # a Hub id (owner/name) or one of our local names
    base_revision: str
    lora: dict[str, Any]  # modeling.lora.wrap's spec: r, alpha, dropout, target_modules, seed
    keys: tuple[str, ...] | None = None  # the shard trained and sent back; None: the whole adapter
    upload_dtype: str = "fp32"  # how the update goes back: protocol/update.py
    # the base's precision: none | nf4 | int8, or auto: the node's memory plan picks (modeling/memory.py),
    # with the micro-batch and gradient checkpointing its memory needs; the update is the same either way
    quantization: str = "auto"
    steps: int
    batch_size: int  # examples per optimizer step: the effective batch, whatever the micro-batch
    lr: float
    max_length: int
    seed: int = 0  # the data order's seed is seed + round
    data: str = "local"  # one of DATA_MODES; the four fields below only with "campaign" (node/data.py)
    datasets: tuple[str, ...] = ()  # the campaign's dataset CIDs, in campaign order
    data_source: str = ""  # the trustless gateway the node fetches dataset blocks from
    data_slot: int = 0  # this node's slice: records data_slot, data_slot + data_slots, …
    data_slots: int = 1

    def to_config(self) -> dict[str, Any]:
        """The flat dict Flower's ConfigRecord carries."""
        config: dict[str, Any] = {
            "campaign": self.campaign, "round": self.round, "base_model": self.base_model,
            "base_revision": self.base_revision, "lora": json.dumps(self.lora, sort_keys=True),
        }
        if self.keys is not None:
            config["keys"] = json.dumps(list(self.keys))
        config.update(upload_dtype=self.upload_dtype, quantization=self.quantization, steps=self.steps,
                      batch_size=self.batch_size, lr=self.lr, max_length=self.max_length, seed=self.seed,
                      data=self.data)
        if self.data == "campaign":
            config.update(datasets=json.dumps(list(self.datasets)), data_source=self.data_source,
                          data_slot=self.data_slot, data_slots=self.data_slots)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainInstruction:
        """The instruction in a received ConfigRecord. Raises CommonsError, one line, for a key that is
        missing (campaign, round, base_model, base_revision, lora, steps, batch_size, lr, max_length; with
        data = "campaign" also datasets, data_slot, data_slots), a value of the wrong type, lora that is
        not a JSON object with a whole-number r, or a data mode this node does not know."""
        read = _Reader(config, "the coordinator's instruction", _SAME_VERSION)
        lora = read.json("lora", dict, "a JSON object")
        if "r" in lora and not _KINDS["int"][0](lora["r"]):
            read.wrong("lora.r", lora["r"], "a whole number")
        data = read.get("data", "str", "") or "local"
        if data not in DATA_MODES:  # a newer coordinator's mode
            raise CommonsError(f"the coordinator asked for data = {data!r}; this node knows "
                               f"{', '.join(DATA_MODES)}: update the node (pip install -U lora-commons)")
        slices = {}
        if data == "campaign":
            slices = {"datasets": read.strings("datasets"), "data_source": read.get("data_source", "str", ""),
                      "data_slot": read.get("data_slot", "int"), "data_slots": read.get("data_slots", "int")}
        return cls(
            campaign=read.get("campaign", "str"), round=read.get("round", "int"),
            base_model=read.get("base_model", "str"), base_revision=read.get("base_revision", "str"),
            lora=lora, keys=read.strings("keys", None), upload_dtype=read.get("upload_dtype", "str", "fp32"),
            quantization=read.get("quantization", "str", "auto"), steps=read.get("steps", "int"),
            batch_size=read.get("batch_size", "int"), lr=read.get("lr", "number"),
            max_length=read.get("max_length", "int"), seed=read.get("seed", "int", 0), data=data, **slices,
        )


@dataclass(frozen=True, kw_only=True)
class Capability:
    """What a node's machine can give (node.hardware.detect): the shard plan sizes its span by it, and
    both sides' memory plans (modeling.memory.Device.from_capability) read the free memory and bf16."""

    device: str  # one of DEVICES
    vram_gb: float | None = None  # free GPU memory (capped by --max-vram); None without a CUDA GPU
    cpu_cores: int = 1  # the threads it trains with
    ram_gb: float = 0.0  # 0: it could not tell
    ram_free_gb: float | None = None  # what a new allocation gets without swapping; None: it could not tell
    bf16: bool = False  # a CUDA card that trains in bfloat16
    gpu: str = ""  # the card's name

    def to_report(self) -> dict[str, Any]:
        """The JSON object on the wire (and the dict the coordinator plans with)."""
        report = {"device": self.device, "vram_gb": self.vram_gb, "cpu_cores": self.cpu_cores,
                  "ram_gb": self.ram_gb, "ram_free_gb": self.ram_free_gb, "bf16": self.bf16}
        return {**report, "gpu": self.gpu} if self.gpu else report

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> Capability:
        """Raises CommonsError, one line: no device, a device not in DEVICES, or a value of the wrong type."""
        read = _Reader(report, "the node's capability report", "update the node")
        device = read.get("device", "str")
        if device not in DEVICES:
            read.wrong("device", device, f"one of {', '.join(DEVICES)}")
        return cls(device=device, vram_gb=read.get("vram_gb", "number", None),
                   cpu_cores=read.get("cpu_cores", "int", 1), ram_gb=read.get("ram_gb", "number", 0.0),
                   ram_free_gb=read.get("ram_free_gb", "number", None), bf16=read.get("bf16", "bool", False),
                   gpu=read.get("gpu", "str", ""))


@dataclass(frozen=True, kw_only=True)
class NodeInfo:
    """A node's answer to the coordinator's `query` message, its `info` ConfigRecord: who it is (the
    ed25519 key its updates are signed with, hex, and its libp2p peer id), what its machine can give, and
    how many local records it holds (0: it trains only on a campaign's datasets).

    The node builds it (node.worker.query); the coordinator reads it to plan a round
    (coordinator.rounds.capabilities). Without a public_key a node is planned under "" and its update,
    signed with a real key, is dropped: what an older coordinator did."""

    public_key: str = ""
    peer_id: str = ""
    capability: Capability  # one JSON object on the wire
    examples: int = 0

    def to_config(self) -> dict[str, Any]:
        return {"public_key": self.public_key, "peer_id": self.peer_id,
                "capability": json.dumps(self.capability.to_report()), "examples": self.examples}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NodeInfo:
        """Raises CommonsError, one line: no capability report, or a value of the wrong type (in either)."""
        read = _Reader(config, "the node's query answer", "update the node")
        return cls(public_key=read.get("public_key", "str", ""), peer_id=read.get("peer_id", "str", ""),
                   capability=Capability.from_report(read.json("capability", dict, "a JSON object")),
                   examples=read.get("examples", "int", 0))
