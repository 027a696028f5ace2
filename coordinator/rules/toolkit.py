"""What every rule works with: updates, settings, the report, the LoRA key structure and the arithmetic.

Pure functions on PEFT state dicts (`dict[str, np.ndarray]`). A "module" is one LoRA pair (its A and B
keys share a prefix) or one non-LoRA tensor on its own; clipping, selection and weights act per module.

Every rule rejects (never raises on) what a node can get wrong: wrong keys or shapes, non-float dtypes,
num_examples that is not a positive int, NaN/Inf (a NaN would poison the global model for everyone, so
even "fedavg" refuses it). Rejections are listed in the report with a one-line reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from coordinator import privacy
from protocol.errors import CommonsError

Tensors = dict[str, np.ndarray]
_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Update:
    node_id: str
    tensors: Tensors
    num_examples: int


@dataclass(frozen=True)
class AggregateConfig:
    combine: str = "trimmed_mean"  # robust node selection: a name in robust.COMBINES
    max_examples: int = 100_000  # cap on one node's claimed num_examples
    median_cap_factor: float = 4.0  # ... and at this many times the median claim
    clip_factor: float = 2.0  # per module: bound = clip_factor × the median norm of that module's deltas
    clip_norm: float | None = None  # and, if set, a fixed bound on the whole update's delta L2 norm
    trim_ratio: float = 0.25  # trims k = max(1, ⌊0.25 n⌋) per side: outvotes up to a quarter of nodes
    min_kept_ratio: float = 0.5
    outlier_factor: float = 2.5
    krum_f: int | None = None
    exact: bool = False  # robust: FedEx-LoRA over the accepted nodes instead of plain averaging
    view_coords: int = 4096  # ΔW coordinates looked at per module (all of them for smaller modules)
    seed: int | None = None  # coordinate sampling and DP noise; None = fresh randomness every call
    dp: privacy.DPConfig | None = None

    def check(self) -> None:
        """Raises CommonsError for a number out of range (the names are checked by `rules.create`)."""
        if self.max_examples < 1 or self.median_cap_factor <= 0 or self.clip_factor <= 0:
            raise CommonsError(
                "max_examples, median_cap_factor and clip_factor must be positive; fix the config"
            )
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise CommonsError(f"clip_norm must be > 0 or None, got {self.clip_norm}")
        if not 0 <= self.trim_ratio < 0.5:
            raise CommonsError(f"trim_ratio must be in [0, 0.5), got {self.trim_ratio}")
        if self.view_coords < 1:
            raise CommonsError(f"view_coords must be >= 1, got {self.view_coords}")
        if self.dp is not None:
            self.dp.check()


@dataclass
class AggregateReport:
    rule: str
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # node_id -> one-line reason
    clipped: dict[str, float] = field(default_factory=dict)  # node_id -> smallest factor a delta got
    weights: dict[str, float] = field(default_factory=dict)  # accepted node_id -> weight, mean over modules
    scores: dict[str, float] = field(default_factory=dict)  # robust selection score per candidate
    residuals: dict[str, np.ndarray] = field(default_factory=dict)  # exact rule: prefix -> out×in
    excluded: dict[str, int] = field(default_factory=dict)  # accepted node_id -> modules it was left out of
    module_weights: dict[str, np.ndarray] = field(default_factory=dict)  # module -> weights, as `accepted`
    unchanged: list[str] = field(default_factory=list)  # keys no accepted update covered
    clip_bound: float | None = None
    dp: dict | None = None
    parts: list[AggregateReport] = field(default_factory=list)  # aggregate_sharded: one per key group

    def to_dict(self) -> dict:
        """JSON-ready summary (residual arrays as shapes)."""
        return {
            "rule": self.rule,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "clipped": self.clipped,
            "weights": self.weights,
            "scores": {k: (None if math.isnan(v) else v) for k, v in self.scores.items()},
            "excluded": self.excluded,
            "residuals": {k: list(v.shape) for k, v in self.residuals.items()},
            "unchanged": self.unchanged,
            "clip_bound": self.clip_bound,
            "dp": self.dp,
            "parts": [p.to_dict() for p in self.parts],
        }


# --- the LoRA key structure ------------------------------------------------------------------------


def split_key(key: str) -> tuple[str, str | None]:
    """PEFT state-dict key -> (module prefix, "A" | "B"); non-LoRA keys -> (key, None)."""
    m = _LORA_KEY.match(key)
    return (m["prefix"], m["ab"]) if m else (key, None)


@dataclass(frozen=True)
class Module:
    name: str  # LoRA prefix, or the key itself for a non-LoRA tensor
    keys: tuple[str, ...]  # (A key, B key) or (key,)

    @property
    def lora(self) -> bool:
        return len(self.keys) == 2


def modules(keys: list[str]) -> list[Module]:
    """Complete LoRA pairs (sorted by prefix), then every other key as a module of its own."""
    halves: dict[str, dict[str, str]] = {}
    for k in keys:
        prefix, ab = split_key(k)
        if ab is not None:
            halves.setdefault(prefix, {})[ab] = k
    pairs = [Module(p, (h["A"], h["B"])) for p, h in sorted(halves.items()) if len(h) == 2]
    paired = {k for m in pairs for k in m.keys}
    return pairs + [Module(k, (k,)) for k in sorted(keys) if k not in paired]


def key_columns(mods: list[Module]) -> dict[str, int]:
    """Key -> the column of its module in a nodes × modules array."""
    return {k: j for j, m in enumerate(mods) for k in m.keys}


# --- what is sound -----------------------------------------------------------------------------------


def check_update(global_t: Tensors, u: Update) -> str | None:
    """Why `u` cannot be aggregated against `global_t` (None when its structure is fine)."""
    n = u.num_examples
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        return f"num_examples must be a positive integer, got {n!r}"
    if set(u.tensors) != set(global_t):
        missing, extra = sorted(set(global_t) - set(u.tensors)), sorted(set(u.tensors) - set(global_t))
        eg = (missing or extra)[0]
        return (
            f"wrong keys: {len(missing)} missing, {len(extra)} unexpected (e.g. {eg}); "
            "send exactly the plan's keys"
        )
    shape = getattr(u.tensors, "shape", None)  # lazily decoded: float32 by construction, shapes known
    for k, g in global_t.items():
        if shape is not None:
            if shape(k) != g.shape:
                return f"{k}: shape {shape(k)}, expected {tuple(g.shape)}"
            continue
        x = u.tensors[k]
        if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
            return f"{k}: expected a float array, got {getattr(x, 'dtype', type(x).__name__)}"
        if x.shape != g.shape:
            return f"{k}: shape {tuple(x.shape)}, expected {tuple(g.shape)}"
    return None


def checked_global(global_tensors: Tensors) -> Tensors:
    """The global adapter as float32 arrays; raises CommonsError when it is empty, non-finite or unpaired."""
    if not global_tensors:
        raise CommonsError("the global adapter has no tensors; pass the campaign's initial LoRA state dict")
    g = {k: np.asarray(v, dtype=np.float32) for k, v in global_tensors.items()}
    bad = [k for k, v in g.items() if not np.isfinite(v).all()]
    if bad:
        raise CommonsError(f"the global adapter has NaN/Inf in {bad[0]}; restore it from the last good round")
    for m in modules(sorted(g)):
        if m.lora:
            a, b = g[m.keys[0]], g[m.keys[1]]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise CommonsError(f"{m.name}: lora_A {a.shape} and lora_B {b.shape} do not share a rank")
    return g


def structurally_sound(g: Tensors, updates: list[Update], report: AggregateReport) -> list[Update]:
    """The updates with the right keys, shapes and dtypes, one per node, read as float32; the rest
    rejected."""
    ok: list[Update] = []
    seen: set[str] = set()
    for u in updates:
        why = "sent more than one update this round" if u.node_id in seen else None
        why = why or check_update(g, u)
        seen.add(u.node_id)
        if why:
            report.rejected[u.node_id] = why
        else:
            ok.append(Update(u.node_id, Float32(u.tensors), int(u.num_examples)))
    return ok


class Float32(Mapping[str, np.ndarray]):
    """An update's tensors (or those of `keys`), each read as float32 when read: nothing is copied, so an
    update decoded lazily (protocol.update.Decoded) stays in its compact wire form between reads. A round
    of 1,024 int8 updates of a 7B shard holds 3.5 GB this way, 14 GB as float32 copies."""

    def __init__(self, tensors: Mapping[str, np.ndarray], keys: Iterable[str] | None = None) -> None:
        self.tensors = tensors.tensors if isinstance(tensors, Float32) else tensors
        self.names = tuple(tensors) if keys is None else tuple(keys)
        self.known = frozenset(self.names)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.known:
            raise KeyError(key)
        return np.asarray(self.tensors[key], dtype=np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor `key`, without decoding it."""
        inner = getattr(self.tensors, "shape", None)
        return inner(key) if inner is not None else tuple(np.shape(self.tensors[key]))


def drop_nonfinite(
    ok: list[Update], norms: np.ndarray, report: AggregateReport
) -> tuple[list[Update], np.ndarray]:
    """The updates (and their rows of norms) whose every module norm is finite; the rest rejected."""
    good = np.isfinite(norms).all(axis=1)
    for u in (u for u, k in zip(ok, good) if not k):
        report.rejected[u.node_id] = (
            "NaN, Inf or overflowing values; the node must reset to the global adapter"
        )
    return [u for u, k in zip(ok, good) if k], norms[good]


def unchanged(g: Tensors, report: AggregateReport) -> tuple[Tensors, AggregateReport]:
    """A copy of the global adapter: no update was usable."""
    report.unchanged = sorted(g)
    return {k: v.copy() for k, v in g.items()}, report


# --- norms, caps and clipping ------------------------------------------------------------------------


def module_norms(global_t: Tensors, tensors: Tensors, mods: list[Module]) -> np.ndarray:
    """L2 norm of the parameter delta per module; inf where any value is non-finite or overflows."""
    out = np.empty(len(mods))
    buffers: dict[tuple[int, ...], np.ndarray] = {}  # reused: fresh 100 KB+ arrays cost page faults
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is the answer here, not a bug
        for j, mod in enumerate(mods):
            total = 0.0
            for k in mod.keys:
                g = global_t[k]
                d = buffers.setdefault(g.shape, np.empty_like(g))
                np.subtract(tensors[k], g, out=d)
                total += float(np.dot(d.reshape(-1), d.reshape(-1)))
            out[j] = math.sqrt(total) if math.isfinite(total) else math.inf
    return out


def capped_examples(claimed: np.ndarray, max_examples: int, median_factor: float) -> np.ndarray:
    """A volunteer cannot buy weight by claiming a huge dataset: cap at max and at k × median."""
    cap = min(float(max_examples), median_factor * float(np.median(claimed)))
    return np.minimum(claimed.astype(np.float64), cap)


def clip_factors(norms: np.ndarray, bound: float | np.ndarray) -> np.ndarray:
    """Factor per delta that brings its norm down to `bound` (1 when already within)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norms > bound, bound / np.maximum(norms, 1e-300), 1.0)


def clip_whole(norms: np.ndarray, factors: np.ndarray, bound: float | None) -> np.ndarray:
    """`factors` (nodes × modules), further scaled so each whole clipped update is within `bound`."""
    if bound is None:
        return factors
    total = np.sqrt(((factors * norms) ** 2).sum(axis=1, keepdims=True))
    return factors * clip_factors(total, bound)


def clip_parameters(g: Tensors, t: Tensors, factors: np.ndarray, mods: list[Module]) -> Tensors:
    """`t` with each module's delta from `g` scaled by its factor (modules within bounds are shared)."""
    out = dict(t)
    for f, m in zip(factors, mods):
        if f < 1.0:
            for k in m.keys:
                out[k] = g[k] + np.float32(f) * (t[k] - g[k])
    return out


# --- averaging ---------------------------------------------------------------------------------------


def weighted_average(
    global_t: Tensors, tensors: list[Tensors], coefs: np.ndarray | dict[str, np.ndarray]
) -> Tensors:
    """g + Σ c_i (x_i − g) per key, computed as (1 − Σ c) g + Σ c_i x_i so each update is read once.
    `coefs` is one vector for every key or a vector per key."""
    out: Tensors = {}
    for k, g in global_t.items():
        c = coefs[k] if isinstance(coefs, dict) else coefs
        base = 1.0 - float(np.sum(c))
        acc = g * np.float32(base) if abs(base) > 1e-7 else np.zeros_like(g)
        tmp = np.empty_like(g)
        for t, ci in zip(tensors, c):
            if ci != 0.0:
                np.multiply(t[k], np.float32(ci), out=tmp)
                acc += tmp
        out[k] = acc
    return out
