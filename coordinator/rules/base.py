"""What a rule is: the pipeline every rule runs, the hooks a rule overrides, and what it carries.

    sound updates ─ norms (non-finite dropped) ─ weights (`examples`) ─ `clip` ─ `select` ─ `mean` ─ DP noise
                                                                          (robust)   (exact: + residual)

`Rule.aggregate` validates the global adapter and the updates, then runs the steps above; a rule
changes only the hooks it needs (`fedavg.FedAvg` short-cuts the whole thing). Weights and clip factors
are nodes × modules arrays, so a rule may weigh or drop a node module by module.

A `Carry` is what a rule keeps across one campaign's rounds besides the adapter. The runner calls it at
fixed points (resume, after each aggregation, evaluation, checkpoint, publish); the base one keeps
nothing, the exact rule's (`exact.Residual`) keeps its full-rank residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator import privacy
from coordinator.rules.toolkit import (
    AggregateConfig,
    AggregateReport,
    Module,
    Tensors,
    Update,
    checked_global,
    clip_whole,
    drop_nonfinite,
    key_columns,
    module_norms,
    modules,
    structurally_sound,
    unchanged,
    weighted_average,
)
from protocol.errors import CommonsError


@dataclass
class Pool:
    """The updates still in the running; each array has one row per update (nodes × modules)."""

    updates: list[Update]
    norms: np.ndarray
    weights: np.ndarray
    factors: np.ndarray  # clip factor per node and module

    def only(self, keep: np.ndarray) -> Pool:
        kept = [u for u, k in zip(self.updates, keep) if k]
        return Pool(kept, self.norms[keep], self.weights[keep], self.factors[keep])


class Carry:
    """What a rule keeps across a campaign's rounds besides the adapter: nothing, for most rules."""

    def restore(self, saved: Tensors) -> Tensors:
        """The adapter from a round checkpoint's arrays (keeping whatever else they hold)."""
        return saved

    def absorb(self, report: AggregateReport) -> None:
        """Take in what this round's aggregation adds."""

    def fold(self, model: Any) -> None:
        """Make `model` compute what the nodes averaged (its adapter already set)."""

    def checkpoint(self, tensors: Tensors) -> Tensors:
        """The arrays a round checkpoint saves: the adapter and whatever is carried."""
        return tensors

    def published(self, model: Any, tensors: Tensors) -> Tensors | None:
        """The adapter to publish when it is not `tensors` itself (None), with `model` unfolded again."""
        return None


class Rule:
    """One aggregation rule with its settings; `rules.create` makes one (see the registry)."""

    name: ClassVar[str] = ""

    def __init__(self, config: AggregateConfig | None = None) -> None:
        self.config = config or AggregateConfig()
        self.check()

    def check(self) -> None:
        """Raises CommonsError for settings this rule cannot honour."""
        self.config.check()
        if self.config.dp is not None and self.keeps_residual():
            raise CommonsError(
                "central DP does not cover the exact rule's full-rank residual; "
                "use rule 'fedavg' or 'robust' without exact"
            )

    def label(self) -> str:
        """The rule as the report names it."""
        return self.name

    def keeps_residual(self) -> bool:
        """Whether the report carries a full-rank residual (which DP noise does not cover)."""
        return False

    def carry(self, scaling: float) -> Carry:
        """A fresh carry for one campaign; `scaling` is the adapter's lora_alpha / r."""
        return Carry()

    def clip_round(self, global_tensors: Tensors, sent: dict[str, Update], expected: dict[str, list[str]],
                   report: AggregateReport) -> None:
        """With shards, before each node's keys are split into parts (`sharded.py`): nothing by default."""

    def aggregate(self, global_tensors: Tensors, updates: list[Update]) -> tuple[Tensors, AggregateReport]:
        """New global tensors (fresh arrays) and a report of who was accepted, rejected and clipped."""
        g = checked_global(global_tensors)
        report = AggregateReport(rule=self.label())
        ok = structurally_sound(g, updates, report)
        return self.combine(g, ok, report)

    def combine(self, g: Tensors, ok: list[Update],
                report: AggregateReport) -> tuple[Tensors, AggregateReport]:
        """The sound updates `ok` weighed, clipped, selected and averaged."""
        mods = modules(sorted(g))
        rng = np.random.default_rng(self.config.seed)
        norms = np.array([module_norms(g, u.tensors, mods) for u in ok]).reshape(len(ok), len(mods))
        ok, norms = drop_nonfinite(ok, norms, report)
        if not ok:
            return unchanged(g, report)
        claimed = np.array([u.num_examples for u in ok], dtype=np.float64)
        weights = np.repeat(self.examples(claimed)[:, None], len(mods), axis=1)  # nodes × modules
        factors = self.clip(norms)
        report.clip_bound = self.config.dp.clip if self.config.dp else self.config.clip_norm
        report.clipped = {u.node_id: float(f) for u, f in zip(ok, factors.min(axis=1)) if f < 1.0}
        pool = self.select(g, Pool(ok, norms, weights, factors), mods, rng, report)
        return self.average(g, pool, mods, rng, report)

    def examples(self, claimed: np.ndarray) -> np.ndarray:
        """Each node's weight from the num_examples it claims."""
        return claimed

    def clip(self, norms: np.ndarray) -> np.ndarray:
        """Clip factors, nodes × modules: under DP each whole update to dp.clip, else none."""
        return clip_whole(norms, np.ones_like(norms), self.config.dp.clip if self.config.dp else None)

    def select(self, g: Tensors, pool: Pool, mods: list[Module], rng: np.random.Generator,
               report: AggregateReport) -> Pool:
        """The updates (and module weights) to average: all of them by default."""
        return pool

    def average(self, g: Tensors, pool: Pool, mods: list[Module], rng: np.random.Generator,
                report: AggregateReport) -> tuple[Tensors, AggregateReport]:
        """Weights normalised per module, the mean, DP noise, and the report filled in."""
        weights = pool.weights
        if self.config.dp:
            weights = (weights > 0).astype(np.float64)  # equal weights: the sensitivity is one clipped update
        totals = weights.sum(axis=0)
        weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
        columns = key_columns(mods)
        report.module_weights = {m.name: weights[:, j] for j, m in enumerate(mods)}
        new = self.mean(g, [u.tensors for u in pool.updates], weights, pool.factors, mods, report)
        if self.config.dp:
            counts = {k: int((weights[:, j] > 0).sum()) for k, j in columns.items()}
            new = privacy.add_noise(new, counts, self.config.dp, rng)
            report.dp = privacy.report(self.config.dp, len(pool.updates))
        report.unchanged = sorted(k for k, j in columns.items() if totals[j] == 0)
        report.accepted = [u.node_id for u in pool.updates]
        report.weights = {u.node_id: float(w) for u, w in zip(pool.updates, weights.mean(axis=1))}
        return new, report

    def mean(self, g: Tensors, tensors: list[Tensors], weights: np.ndarray, factors: np.ndarray,
             mods: list[Module], report: AggregateReport) -> Tensors:
        """The clipped updates averaged key by key, with their module's weights."""
        columns = key_columns(mods)
        return weighted_average(g, tensors, {k: weights[:, j] * factors[:, j] for k, j in columns.items()})
