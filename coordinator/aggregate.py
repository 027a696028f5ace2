"""Aggregating federated LoRA updates: pure functions on PEFT state dicts (`dict[str, np.ndarray]`).

    >>> updates = [Update("node-a", tensors_a, num_examples=120), Update("node-b", tensors_b, 80)]
    >>> new, report = aggregate(global_tensors, updates)            # "robust", the default
    >>> new, report = aggregate(global_tensors, updates, "exact")   # + report.residuals
    >>> new, report = coordinator.plan.aggregate_sharded(global_tensors, updates, plan)

Rules (`rule=`):
- "fedavg": A and B averaged separately, weighted by num_examples. mean(B)·mean(A) ≠ mean(B·A), so the
  aggregate is not the average of what the nodes learned (see `product_gap`).
- "exact": FedEx-LoRA (Singhal et al. 2024). A and B are averaged as in fedavg, and the residual
  Σ w_i B_i A_i − B̄ Ā of every module is returned in `report.residuals` (prefix -> out×in, in units of
  B·A: the coordinator adds `scaling × residual` to the frozen base weight or keeps it as a full-rank
  delta). B̄Ā + residual equals the weighted mean of the products exactly. We chose FedEx-LoRA over FLoRA
  stacking because the adapter keeps its rank: what we publish stays a standard PEFT adapter with the
  campaign's lora_config, nodes keep the tensor shapes the plan and `check_update` expect, and the
  upload does not grow with rounds × nodes. The cost is a full-rank residual on the coordinator, which a
  published adapter cannot carry: that is why it is opt-in rather than the default.
- "robust" (default, for an open network): reject malformed updates; cap each claimed num_examples at
  `max_examples` and at `median_cap_factor` × the median claim; clip each update's parameter delta
  (its A and B vs the current global) per module to `clip_factor` × that module's median norm, and the
  whole update to `clip_norm` if set; then judge the clipped updates with `coordinator.robust` on their
  reconstructed ΔW_i = B_i A_i − B_g A_g (trimmed_mean by default, or median, krum), per node and per
  module, and average the kept updates' A and B module by module (or, with `exact=True`, apply the exact
  rule over them). Clipping acts on parameters because parameters are what we average (and what DP noise
  is added to); selection acts on ΔW because that is what the model sees. Clipping per module stops a
  node from spending its whole norm budget on one module.
- central DP (`config.dp`, with "fedavg" or "robust"): each update is clipped to dp.clip as a whole,
  weights are equal, and N(0, (σ·clip)²) is added to the sum; `report.dp` holds (ε, δ) after dp.rounds
  (see `coordinator.privacy`).

Every rule rejects (never raises on) what a node can get wrong: wrong keys or shapes, non-float dtypes,
num_examples that is not a positive int, NaN/Inf (a NaN would poison the global model for everyone, so
even "fedavg" refuses it). Rejections are listed in the report with a one-line reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from coordinator import privacy, robust
from protocol.errors import CommonsError

Tensors = dict[str, np.ndarray]
RULES = ("fedavg", "exact", "robust")
COMBINES = ("trimmed_mean", "median", "krum")


@dataclass
class Update:
    node_id: str
    tensors: Tensors
    num_examples: int


@dataclass(frozen=True)
class AggregateConfig:
    combine: str = "trimmed_mean"  # robust node selection: trimmed_mean | median | krum
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

    def check(self, rule: str) -> None:
        if rule not in RULES:
            raise CommonsError(f"unknown aggregation rule {rule!r}; use one of {', '.join(RULES)}")
        if self.combine not in COMBINES:
            raise CommonsError(f"unknown robust combine {self.combine!r}; use one of {', '.join(COMBINES)}")
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
            if rule == "exact" or (rule == "robust" and self.exact):
                raise CommonsError(
                    "central DP does not cover the exact rule's full-rank residual; "
                    "use rule 'fedavg' or 'robust' without exact"
                )


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


def check_update(global_t: Tensors, u: Update) -> str | None:
    """Why `u` cannot be aggregated against `global_t` (None when its structure is fine)."""
    n = u.num_examples
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        return f"num_examples must be a positive integer, got {n!r}"
    if set(u.tensors) != set(global_t):
        missing, extra = sorted(set(global_t) - set(u.tensors)), sorted(set(u.tensors) - set(global_t))
        eg = (missing or extra)[0]
        return f"wrong keys: {len(missing)} missing, {len(extra)} unexpected (e.g. {eg}); send exactly the plan's keys"
    for k, g in global_t.items():
        x = u.tensors[k]
        if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
            return f"{k}: expected a float array, got {getattr(x, 'dtype', type(x).__name__)}"
        if x.shape != g.shape:
            return f"{k}: shape {tuple(x.shape)}, expected {tuple(g.shape)}"
    return None


def module_norms(global_t: Tensors, tensors: Tensors, mods: list[robust.Module]) -> np.ndarray:
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


def mean_product(
    tensors: list[Tensors], weights: np.ndarray | dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Σ w_i B_i A_i per LoRA module (float64): what the nodes' models add to the base weights on average.
    `weights` is one vector for every module or a vector per module name."""
    out = {}
    for m in robust.modules(sorted(tensors[0])):
        if m.lora:
            w = weights[m.name] if isinstance(weights, dict) else weights
            ka, kb = m.keys
            out[m.name] = sum(
                (
                    float(wi) * (t[kb].astype(np.float64) @ t[ka].astype(np.float64))
                    for t, wi in zip(tensors, w)
                ),
                start=np.zeros((tensors[0][kb].shape[0], tensors[0][ka].shape[1])),
            )
    return out


def fedex_residuals(
    tensors: list[Tensors], weights: np.ndarray | dict[str, np.ndarray], averaged: Tensors
) -> dict[str, np.ndarray]:
    """FedEx-LoRA residual per module: Σ w_i B_i A_i − B̄ Ā (float32, out×in)."""
    means = mean_product(tensors, weights)
    return {
        m.name: (
            means[m.name] - averaged[m.keys[1]].astype(np.float64) @ averaged[m.keys[0]].astype(np.float64)
        ).astype(np.float32)
        for m in robust.modules(sorted(averaged))
        if m.lora
    }


def product_gap(
    tensors: list[Tensors],
    weights: np.ndarray | dict[str, np.ndarray],
    new: Tensors,
    residuals: dict[str, np.ndarray] | None = None,
) -> float:
    """Largest relative error, over modules, of B_new A_new (+ residual) vs Σ w_i B_i A_i.
    ~1e-7 for "exact"; for "fedavg" it is the cross-term error mean(B)mean(A) − mean(BA)."""
    worst = 0.0
    for name, want in mean_product(tensors, weights).items():
        m = next(m for m in robust.modules(sorted(new)) if m.name == name)
        got = new[m.keys[1]].astype(np.float64) @ new[m.keys[0]].astype(np.float64)
        if residuals:
            got = got + residuals[name]
        worst = max(worst, float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)))
    return worst


def aggregate(
    global_tensors: Tensors,
    updates: list[Update],
    rule: str = "robust",
    config: AggregateConfig | None = None,
) -> tuple[Tensors, AggregateReport]:
    """New global tensors (fresh arrays) and a report of who was accepted, rejected and clipped."""
    config = config or AggregateConfig()
    config.check(rule)
    g = _checked_global(global_tensors)
    mods = robust.modules(sorted(g))
    report = AggregateReport(rule=rule if rule != "robust" else f"robust/{config.combine}")
    ok = _structurally_sound(g, updates, report)
    if rule == "fedavg" and config.dp is None:
        return _fedavg_fast(g, ok, report)
    rng = np.random.default_rng(config.seed)
    norms = np.array([module_norms(g, u.tensors, mods) for u in ok]).reshape(len(ok), len(mods))
    ok, norms = _drop_nonfinite(ok, norms, report)
    if not ok:
        return _unchanged(g, report)
    claimed = np.array([u.num_examples for u in ok], dtype=np.float64)
    examples = (
        capped_examples(claimed, config.max_examples, config.median_cap_factor)
        if rule == "robust"
        else claimed
    )
    factors = _clip(norms, rule, config)
    report.clip_bound = config.dp.clip if config.dp else config.clip_norm
    report.clipped = {u.node_id: float(f) for u, f in zip(ok, factors.min(axis=1)) if f < 1.0}
    weights = np.repeat(examples[:, None], len(mods), axis=1)  # nodes × modules
    if rule == "robust":
        sel = _select(g, ok, factors, mods, config, rng)
        report.scores = {u.node_id: float(s) for u, s in zip(ok, sel.score)}
        report.rejected.update(
            {u.node_id: sel.reason.format(score=s) for u, s, k in zip(ok, sel.score, sel.keep) if not k}
        )
        if not sel.keep.all():
            # a rejected node must count as absent: its norm moved the clip bound and its coordinates
            # moved the per-module weights, which would tilt the average toward the honest node nearest it
            ok, norms, examples = [u for u, k in zip(ok, sel.keep) if k], norms[sel.keep], examples[sel.keep]
            weights, factors = weights[sel.keep], _clip(norms, rule, config)
            report.clipped.update({u.node_id: float(f) for u, f in zip(ok, factors.min(axis=1)) if f < 1.0})
            again = _select(g, ok, factors, mods, config, rng)
            sel = robust.Selection(sel.score[sel.keep], np.ones(len(ok), dtype=bool), again.module_keep,
                                   again.module_weight, sel.reason)
        mask = sel.keep[:, None] & sel.module_keep
        weights = weights * mask * (1.0 if config.dp else sel.module_weight)
        report.excluded = {
            u.node_id: int((~row).sum()) for u, row, k in zip(ok, mask, sel.keep) if k and not row.all()
        }
        ok, weights, factors = [u for u, k in zip(ok, sel.keep) if k], weights[sel.keep], factors[sel.keep]
    if config.dp:
        weights = (weights > 0).astype(np.float64)  # equal weights: the sensitivity is one clipped update
    totals = weights.sum(axis=0)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
    by_key = {k: j for j, m in enumerate(mods) for k in m.keys}
    report.module_weights = {m.name: weights[:, j] for j, m in enumerate(mods)}
    tensors = [u.tensors for u in ok]
    if rule == "exact" or (rule == "robust" and config.exact):
        tensors = [_clipped(g, t, f, mods) for t, f in zip(tensors, factors)]
        new = weighted_average(g, tensors, {k: weights[:, j] for k, j in by_key.items()})
        report.residuals = fedex_residuals(tensors, report.module_weights, new)
    else:
        new = weighted_average(g, tensors, {k: weights[:, j] * factors[:, j] for k, j in by_key.items()})
    if config.dp:
        new = privacy.add_noise(
            new, {k: int((weights[:, j] > 0).sum()) for k, j in by_key.items()}, config.dp, rng
        )
        report.dp = privacy.report(config.dp, len(ok))
    report.unchanged = sorted(k for k, j in by_key.items() if totals[j] == 0)
    report.accepted = [u.node_id for u in ok]
    report.weights = {u.node_id: float(w) for u, w in zip(ok, weights.mean(axis=1))}
    return new, report


def _select(g: Tensors, ok: list[Update], factors: np.ndarray, mods: list[robust.Module], config: AggregateConfig,
            rng: np.random.Generator) -> robust.Selection:
    return robust.select(
        config.combine, g, [u.tensors for u in ok], factors, mods, coords=config.view_coords, rng=rng,
        trim_ratio=config.trim_ratio, min_kept_ratio=config.min_kept_ratio,
        outlier_factor=config.outlier_factor, byzantine=config.krum_f,
    )


def _clip(norms: np.ndarray, rule: str, config: AggregateConfig) -> np.ndarray:
    """Clip factors, nodes × modules: per module at clip_factor × median (robust), then the whole update
    at clip_norm (robust) or dp.clip (DP)."""
    factors = np.ones_like(norms)
    if rule == "robust":
        factors = clip_factors(norms, config.clip_factor * np.median(norms, axis=0, keepdims=True))
    bound = config.dp.clip if config.dp else (config.clip_norm if rule == "robust" else None)
    if bound is not None:
        total = np.sqrt(((factors * norms) ** 2).sum(axis=1, keepdims=True))
        factors = factors * clip_factors(total, bound)
    return factors


def _checked_global(global_tensors: Tensors) -> Tensors:
    if not global_tensors:
        raise CommonsError("the global adapter has no tensors; pass the campaign's initial LoRA state dict")
    g = {k: np.asarray(v, dtype=np.float32) for k, v in global_tensors.items()}
    bad = [k for k, v in g.items() if not np.isfinite(v).all()]
    if bad:
        raise CommonsError(f"the global adapter has NaN/Inf in {bad[0]}; restore it from the last good round")
    for m in robust.modules(sorted(g)):
        if m.lora:
            a, b = g[m.keys[0]], g[m.keys[1]]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise CommonsError(f"{m.name}: lora_A {a.shape} and lora_B {b.shape} do not share a rank")
    return g


def _structurally_sound(g: Tensors, updates: list[Update], report: AggregateReport) -> list[Update]:
    ok: list[Update] = []
    for u in updates:
        why = "sent more than one update this round" if any(v.node_id == u.node_id for v in ok) else None
        why = why or check_update(g, u)
        if why:
            report.rejected[u.node_id] = why
        else:
            tensors = {k: np.asarray(x, dtype=np.float32) for k, x in u.tensors.items()}
            ok.append(Update(u.node_id, tensors, int(u.num_examples)))
    return ok


def _drop_nonfinite(
    ok: list[Update], norms: np.ndarray, report: AggregateReport
) -> tuple[list[Update], np.ndarray]:
    good = np.isfinite(norms).all(axis=1)
    for u in (u for u, k in zip(ok, good) if not k):
        report.rejected[u.node_id] = (
            "NaN, Inf or overflowing values; the node must reset to the global adapter"
        )
    return [u for u, k in zip(ok, good) if k], norms[good]


def _unchanged(g: Tensors, report: AggregateReport) -> tuple[Tensors, AggregateReport]:
    report.unchanged = sorted(g)
    return {k: v.copy() for k, v in g.items()}, report


def _clipped(g: Tensors, t: Tensors, factors: np.ndarray, mods: list[robust.Module]) -> Tensors:
    out = dict(t)
    for f, m in zip(factors, mods):
        if f < 1.0:
            for k in m.keys:
                out[k] = g[k] + np.float32(f) * (t[k] - g[k])
    return out


def _fedavg_fast(g: Tensors, ok: list[Update], report: AggregateReport) -> tuple[Tensors, AggregateReport]:
    """Plain weighted average. A non-finite input always makes the result non-finite (NaN·0 is NaN), so
    the result is checked once and the updates only looked at one by one when it is not finite."""
    if ok:
        weights = np.array([u.num_examples for u in ok], dtype=np.float64)
        weights /= weights.sum()
        with np.errstate(over="ignore", invalid="ignore"):
            new = weighted_average(g, [u.tensors for u in ok], weights)
            finite = all(math.isfinite(float(np.dot(v.reshape(-1), v.reshape(-1)))) for v in new.values())
        if not finite:
            mods = robust.modules(sorted(g))
            norms = np.array([module_norms(g, u.tensors, mods) for u in ok])
            finite_ok, _ = _drop_nonfinite(ok, norms, report)
            if len(finite_ok) == len(ok):  # finite inputs whose sum overflows: nothing sane to publish
                report.rejected.update({u.node_id: "values so large the average overflows" for u in ok})
                return _unchanged(g, report)
            return _fedavg_fast(g, finite_ok, report)
        report.accepted = [u.node_id for u in ok]
        report.weights = {u.node_id: float(w) for u, w in zip(ok, weights)}
        return new, report
    return _unchanged(g, report)
