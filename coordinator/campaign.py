"""A campaign file (TOML): what to fine-tune, on what, how, and where the result goes.

    name = "dates-iso"
    base_model = "smollm2"
    eval_file = "test.jsonl"
    shards = "auto"                      # each node trains a span of layers sized to its hardware
    quantization = "auto"                # the base on each node: its memory plan picks none or nf4
    data = "campaign"                    # each node trains on its slice of [[datasets]] (default "local")
    data_source = "http://index:8000"    # trustless gateway the nodes fetch dataset blocks from
    [outer]                              # how each round's aggregate moves the adapter (coordinator/outer.py)
    optimizer = "nesterov"               # none (the default: plain averaging) | nesterov (DiLoCo) | adam
    lr = 0.7                             # default per optimizer: none 1, nesterov 0.7, adam 1e-3
    momentum = 0.9                       # nesterov's μ, adam's β1 (adam also reads beta2, eps)
    [dp]                                 # central DP: works with shards = "auto" and "none", not "exact"
    noise_multiplier = 1.0
    clip = 0.5
    [[datasets]]
    cid = "Qm..."                        # printed by `commons data add`
    name = "my-chats"
    license = "CC-BY-4.0"

Central DP with shards: a node's whole upload (every layer it trained, catch-up spans included) is clipped
to `clip` jointly, then N(0, (noise_multiplier·clip)²) is added to every coordinate of each part's sum.
On the concatenated adapter that is one Gaussian mechanism with sensitivity `clip`, so the (ε, δ) reported
is exactly the whole-adapter one. The exact rule is refused with [dp]: its full-rank residual is neither
clipped nor noised.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from coordinator.outer import OPTIMIZERS, OuterConfig
from coordinator.rules import RULES, create
from modeling.load import DEFAULT_TARGETS, canonical_id, default_revision
from protocol.content.multiformats import CID
from protocol.errors import CommonsError

SHARDS = ("auto", "none")
UPLOAD_DTYPES = ("fp32", "bf16", "int8")
QUANTIZATIONS = ("auto", "none", "nf4", "int8")  # nf4/int8: QLoRA, bitsandbytes (modeling/quantization.py)
DATA_MODES = ("local", "campaign")
DEFAULT_LICENSE = "Apache-2.0"  # what an adapter is published under when the campaign file names no licence
DATASET_KEYS = ("cid", "name", "license")

# The range of every number in the campaign file ("where.key", or the bare key at the top level).
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "rounds": (lambda v: v >= 1, "at least 1"),
    "min_nodes": (lambda v: v >= 1, "at least 1"),
    "round_timeout": (lambda v: v >= 1, "at least 1 (seconds)"),
    "node_wait": (lambda v: v >= 0, "0 or more (seconds)"),
    "quorum": (lambda v: 0 < v <= 1, "above 0 and at most 1 (a fraction of the round's volunteers)"),
    "min_coverage": (lambda v: v >= 1, "at least 1"),
    "eval_size": (lambda v: v >= 1, "at least 1"),
    "publish_margin": (lambda v: -1 <= v <= 1, "between -1 and 1 (a fraction: 0.05 is 5 points)"),
    "early_stop": (lambda v: v >= 0, "0 (off) or more rounds"),
    "lora.r": (lambda v: 1 <= v <= 1024, "between 1 and 1024"),
    "lora.alpha": (lambda v: v > 0, "above 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "lora.seed": (lambda v: v >= 0, "0 or more"),
    "train.steps": (lambda v: v >= 1, "at least 1"),
    "train.batch_size": (lambda v: v >= 1, "at least 1"),
    "train.lr": (lambda v: 0 < v <= 1, "above 0 and at most 1 (e.g. 2e-3)"),
    "train.max_length": (lambda v: v >= 8, "at least 8 (tokens)"),
    "outer.lr": (lambda v: 0 < v <= 10, "above 0 and at most 10 (e.g. 0.7)"),
    "outer.momentum": (lambda v: 0 <= v < 1, "at least 0 and below 1 (e.g. 0.9)"),
    "outer.beta2": (lambda v: 0 <= v < 1, "at least 0 and below 1 (e.g. 0.99)"),
    "outer.eps": (lambda v: v > 0, "above 0 (e.g. 1e-6)"),
}
# What each annotation accepts from TOML, and how an error names it; other annotations (the [lora], [train]
# and [dp] tables parse() builds itself) are not checked here.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string in quotes"),
    "Path": (lambda v: isinstance(v, str | Path), "a path in quotes"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "list[dict]": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "a list of tables"),
}


@dataclass
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    seed: int = 0


@dataclass
class TrainSpec:
    steps: int = 8
    batch_size: int = 8
    lr: float = 2e-3
    max_length: int = 128


@dataclass
class DPSpec:
    """Central DP (`[dp]` table): every update clipped to `clip`, N(0, (noise_multiplier·clip)²) added.

    Works with shards = "auto" too: a node's whole upload (all the layers it trained, catch-up spans
    included) is clipped to `clip` jointly and every part's sum gets its own noise, so the mechanism on
    the whole adapter has sensitivity `clip` and the reported (ε, δ) is the same as with shards = "none"
    (see `coordinator.rules.sharded._clip_jointly`). Not with aggregation = "exact": its full-rank
    residual is neither clipped nor noised.
    """

    noise_multiplier: float
    clip: float
    delta: float = 1e-5


@dataclass
class Campaign:
    name: str
    base_model: str
    eval_file: Path
    license: str = ""  # SPDX id the adapter is published under; unset: DEFAULT_LICENSE, said out loud
    base_revision: str = ""
    rounds: int = 2
    min_nodes: int = 1
    round_timeout: float = 900.0
    # a round closes once this fraction of its volunteers answered and the rest had as long again
    # (coordinator/rounds.py: Closing); the late ones' spans go to others where coverage needs them
    quorum: float = 0.5
    # patience: seconds a round waits for min_nodes usable volunteers before failing
    node_wait: float = 1800.0
    aggregation: str = "robust"  # an open network cannot trust every volunteer: robust by default
    shards: str = "auto"  # "auto": each node trains a span of layers sized to its hardware; "none": all
    # nodes training each layer per round (when there are that many): 3 out-vote one liar
    min_coverage: int = 3
    upload_dtype: str = "fp32"  # what nodes send back: fp32 | bf16 | int8 (deltas, per-tensor scale)
    quantization: str = "auto"  # the base on each node: auto (its memory plan decides) | none | nf4 | int8
    # "local": each node its own file; "campaign": its slice of [[datasets]] (node/data.py)
    data: str = "local"
    # gateway nodes fetch dataset blocks from, e.g. "http://index:8000" (data = "campaign")
    data_source: str = ""
    # only registered volunteers join (TLS + SuperNode auth; `commons coordinator start`)
    closed: bool = False
    volunteers: str = ""  # closed campaigns: keys file or folder of *.pub, relative to this file
    eval_size: int = 64
    publish_margin: float = 0.0
    early_stop: int = 0  # stop after this many rounds without a better eval (0: run every round)
    description: str = ""
    task: str = ""
    datasets: list[dict] = field(default_factory=list)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    outer: OuterConfig = field(default_factory=OuterConfig)  # the coordinator's step: coordinator/outer.py
    dp: DPSpec | None = None
    source: Path | None = None

    def published_license(self) -> str:
        return self.license or DEFAULT_LICENSE

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["eval_file"] = str(self.eval_file)
        data["source"] = str(self.source) if self.source else None
        return data


def _section(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise CommonsError(f"[{where}] must be a table in the campaign file")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise CommonsError(
            f"unknown key {where}.{unknown[0]} in the campaign file: {hint}allowed are "
            f"{', '.join(sorted(known))}"
        )
    missing = sorted(k for k, f in cls.__dataclass_fields__.items() if k not in raw and f.default is MISSING
                     and f.default_factory is MISSING)
    if missing:
        raise CommonsError(f"[{where}] needs `{missing[0]} = ...` in the campaign file")
    fields = cls.__dataclass_fields__
    return cls(**{key: _typed(where, key, value, fields[key]) for key, value in raw.items()})


def _typed(where: str, key: str, value: Any, spec: Any) -> Any:
    """`value` as its field's type and within its range, or one line that says what to write."""
    name = key if where == "campaign" else f"{where}.{key}"
    kind = str(spec.type).removesuffix(" | None")
    if kind not in _KINDS:
        return value
    accepts, wanted = _KINDS[kind]
    if not accepts(value):
        raise CommonsError(f"{name} = {_toml(value)} in the campaign file must be "
                           f"{wanted}{_example(key, spec, value)}")
    check = RANGES.get(name)
    if check and not check[0](value):
        raise CommonsError(f"{name} = {_toml(value)} in the campaign file must be {check[1]}")
    return float(value) if kind == "float" else value


def _example(key: str, spec: Any, value: Any) -> str:
    """How the line should read: the number without its quotes, or the field's default."""
    if isinstance(value, str) and str(spec.type) in ("int", "float"):
        try:
            number = int(value) if str(spec.type) == "int" else float(value)
        except ValueError:
            pass
        else:
            return f": write {key} = {_toml(number)} (no quotes)"
    if spec.default is not MISSING and spec.default not in ("", None):
        return f", e.g. {key} = {_toml(spec.default)}"
    return ""


def parse(raw: dict[str, Any], base_dir: Path) -> Campaign:
    for key in ("name", "base_model", "eval_file"):
        if not raw.get(key):
            raise CommonsError(f"the campaign file needs `{key} = ...`")
    raw = dict(raw)
    lora = _section(LoraSpec, raw.pop("lora", {}), "lora")
    train = _section(TrainSpec, raw.pop("train", {}), "train")
    outer = _section(OuterConfig, raw.pop("outer", {}), "outer")
    if outer.optimizer not in OPTIMIZERS:
        raise CommonsError(f"outer.optimizer = {outer.optimizer!r} is unknown: use one of "
                           f"{', '.join(OPTIMIZERS)}")
    outer.lr = outer.rate  # unset: the optimizer's own default, written out so the fingerprint holds it
    dp = _section(DPSpec, raw.pop("dp"), "dp") if "dp" in raw else None
    campaign = _section(Campaign, {**raw, "lora": lora, "train": train, "outer": outer, "dp": dp}, "campaign")
    campaign.base_model = canonical_id(campaign.base_model)
    campaign.base_revision = campaign.base_revision or default_revision(campaign.base_model)
    campaign.eval_file = (base_dir / campaign.eval_file).resolve()
    if campaign.volunteers:
        campaign.closed = True
        campaign.volunteers = str((base_dir / campaign.volunteers).resolve())
        if not Path(campaign.volunteers).exists():
            raise CommonsError(f"volunteers = {campaign.volunteers!r} does not exist: point it at the file "
                               "of volunteer keys (one `commons node key` output per line)")
    if campaign.aggregation not in RULES:
        raise CommonsError(
            f"aggregation = {campaign.aggregation!r} is unknown: use one of {', '.join(RULES)}"
        )
    if campaign.shards not in SHARDS:
        raise CommonsError(f"shards = {campaign.shards!r} is unknown: use one of {', '.join(SHARDS)}")
    if campaign.upload_dtype not in UPLOAD_DTYPES:
        raise CommonsError(
            f"upload_dtype = {campaign.upload_dtype!r} is unknown: use one of {', '.join(UPLOAD_DTYPES)}"
        )
    if campaign.quantization not in QUANTIZATIONS:
        raise CommonsError(
            f"quantization = {campaign.quantization!r} is unknown: use one of {', '.join(QUANTIZATIONS)}"
        )
    _check_data(campaign)
    if dp and create(campaign.aggregation).keeps_residual():
        raise CommonsError(
            'central DP cannot cover the exact rule\'s full-rank residual (it is neither clipped nor '
            'noised): set aggregation = "robust" or "fedavg" when [dp] is present'
        )
    if dp and not (dp.noise_multiplier > 0 and dp.clip > 0 and 0 < dp.delta < 1):
        raise CommonsError("[dp] needs noise_multiplier > 0, clip > 0 and 0 < delta < 1 in the campaign file")
    if not campaign.eval_file.is_file():
        raise CommonsError(
            f"eval_file {campaign.eval_file} does not exist: fix the path in the campaign file"
        )
    return campaign


def _check_data(campaign: Campaign) -> None:
    """`data = "campaign"`: every node trains on its slice of the [[datasets]] (fetched by CID from
    `data_source`, verified block by block; the slicing rule is in node/data.py)."""
    if campaign.data not in DATA_MODES:
        raise CommonsError(f"data = {campaign.data!r} is unknown: use one of {', '.join(DATA_MODES)}")
    if campaign.data_source and not campaign.data_source.startswith(("http://", "https://")):
        raise CommonsError(
            f"data_source = {campaign.data_source!r} is not a gateway URL: use e.g. \"http://index:8000\""
        )
    for i, ds in enumerate(campaign.datasets, 1):
        _check_dataset(i, ds)
    if campaign.data == "campaign" and not campaign.datasets:
        raise CommonsError('data = "campaign" needs at least one [[datasets]] table with cid = "..." in the '
                           'campaign file')


def _check_dataset(i: int, ds: dict) -> None:
    """A [[datasets]] table names a real dataset: the manifest cites it, nodes may fetch it (a placeholder
    such as "bafy..." is refused whatever `data` says)."""
    unknown = sorted(set(ds) - set(DATASET_KEYS))
    if unknown:
        raise CommonsError(f"unknown key {unknown[0]} in [[datasets]] entry {i} of the campaign file: "
                           f"allowed are {', '.join(DATASET_KEYS)}")
    cid = ds.get("cid", "")
    try:
        CID.decode(cid if isinstance(cid, str) else "")
    except CommonsError:
        raise CommonsError(f"[[datasets]] entry {i} needs cid = a dataset CID (what `commons data add` "
                           f"printed); {_toml(cid)} is not one") from None
    for key in ("name", "license"):
        if not isinstance(ds.get(key, ""), str):
            raise CommonsError(f"[[datasets]] entry {i}: {key} = {_toml(ds[key])} must be a string in quotes")


def load(path: Path) -> Campaign:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommonsError(f"campaign file {path} not found: pass --campaign FILE.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise CommonsError(f"campaign file {path} is not valid TOML: {exc}") from None
    campaign = parse(raw, path.parent)
    campaign.source = path.resolve()
    return campaign


def dump(campaign: Campaign) -> str:
    """TOML text for a campaign (the demo writes one so the same file runs a real network)."""
    lines = []
    scalars = {
        k: v for k, v in campaign.to_json().items()
        if k not in ("lora", "train", "outer", "dp", "datasets", "source")
    }
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml(value)}")
    for name in ("lora", "train", "outer", "dp"):
        if getattr(campaign, name) is None:
            continue
        lines.append(f"\n[{name}]")
        # a None is "the default": TOML has no null, and leaving the key out means the same
        lines += [f"{k} = {_toml(v)}" for k, v in asdict(getattr(campaign, name)).items() if v is not None]
    for ds in campaign.datasets:
        lines.append("\n[[datasets]]")
        lines += [f"{k} = {_toml(v)}" for k, v in ds.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))
