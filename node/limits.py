"""What a volunteer's node agrees to do: the coordinator's instruction is data, checked against these bounds.

A coordinator chooses the base model, the LoRA shape, the steps and the data; it cannot make a node
load a local path, run unbounded work, or fetch from a non-HTTP URL. Each bound has a sane default and
can be raised by the volunteer in `$COMMONS_HOME/config.toml`:

    [node_limits]
    max_rank = 512

An instruction outside them is refused in one line, which the coordinator records in its events.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlparse

from protocol.errors import CommonsError
from protocol.instruction import TrainInstruction

# a Hub id (owner/name) or one of our local names; never a path on the volunteer's disk
_MODEL = re.compile(r"^(tiny|smollm2|[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})$")
_DTYPES = frozenset({"fp32", "bf16", "fp16", "int8"})


@dataclass(frozen=True)
class NodeLimits:
    max_rank: int = 256
    max_steps: int = 10_000
    max_batch: int = 512
    max_length: int = 16_384
    max_datasets: int = 64
    allow_local_base: bool = False  # a base_model that is a folder on this machine (your own experiments)


def read(home: Path) -> NodeLimits:
    """This volunteer's limits: `[node_limits]` in $COMMONS_HOME/config.toml, over the defaults."""
    path = home / "config.toml"
    try:
        table = (tomllib.loads(path.read_text(encoding="utf-8")).get("node_limits", {})
                 if path.exists() else {})
    except tomllib.TOMLDecodeError as exc:
        raise CommonsError(f"{path} is not valid TOML ({exc}); fix it or delete it and run "
                           "`commons init`") from None
    return load(table)


def load(settings: dict | None) -> NodeLimits:
    """The `[node_limits]` table, over the defaults."""
    settings = settings or {}
    if not isinstance(settings, dict):
        raise CommonsError("node_limits in config.toml must be a table: [node_limits]")
    known = {f.name for f in fields(NodeLimits)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise CommonsError(f"unknown node limit {unknown[0]!r} in config.toml [node_limits]; allowed: "
                           f"{', '.join(sorted(known))}")
    flags = {f.name for f in fields(NodeLimits) if f.type == "bool"}
    bad = [k for k, v in settings.items() if k not in flags
           and (not isinstance(v, int) or isinstance(v, bool) or v < 1)]
    if bad:
        raise CommonsError(f"node_limits.{bad[0]} must be a positive whole number in config.toml")
    wrong = [k for k in flags & set(settings) if not isinstance(settings[k], bool)]
    if wrong:
        raise CommonsError(f"node_limits.{wrong[0]} must be true or false in config.toml")
    return NodeLimits(**settings)


def check(instruction: TrainInstruction, limits: NodeLimits) -> None:
    """Raise CommonsError naming the first part of the instruction this node will not do."""
    for why in _violations(instruction, limits):
        raise CommonsError(f"refused the coordinator's instruction: {why}")


def _violations(instruction: TrainInstruction, limits: NodeLimits):
    model = instruction.base_model
    if not _MODEL.match(model) and not (limits.allow_local_base and Path(model).is_dir()):
        yield (f"base_model {model[:80]!r} is not a Hugging Face id (owner/name); a folder on this machine "
               "needs node_limits.allow_local_base = true in config.toml")
    # no rank is rank 0, refused: the node does not guess one
    yield from _above("LoRA rank", instruction.lora.get("r", 0), limits.max_rank, "max_rank")
    yield from _above("steps", instruction.steps, limits.max_steps, "max_steps")
    yield from _above("batch_size", instruction.batch_size, limits.max_batch, "max_batch")
    yield from _above("max_length", instruction.max_length, limits.max_length, "max_length")
    if not (math.isfinite(instruction.lr) and 0 < instruction.lr <= 1):
        yield f"learning rate {instruction.lr!r} is outside (0, 1]"
    if instruction.upload_dtype not in _DTYPES:
        yield f"upload_dtype {instruction.upload_dtype!r} is not one of {', '.join(sorted(_DTYPES))}"
    source = instruction.data_source
    if source and urlparse(source).scheme not in ("http", "https"):
        yield f"data_source {source[:80]!r} is not an http(s) URL"
    if instruction.data == "campaign":
        yield from _above("datasets", len(instruction.datasets), limits.max_datasets, "max_datasets")


def _above(what: str, value: int, limit: int, name: str):
    if value < 1:
        yield f"{what} {value} must be at least 1"
    elif value > limit:
        yield (f"{what} {value} is above this node's limit {limit} (raise node_limits.{name} in config.toml "
               "to allow it)")

