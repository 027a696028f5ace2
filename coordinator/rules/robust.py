"""robust (the default, for an open network): cap, clip, then judge each update on what it does to the model.

Reject malformed updates; cap each claimed num_examples at `max_examples` and at `median_cap_factor` ×
the median claim; clip each update's parameter delta (its A and B vs the current global) per module to
`clip_factor` × that module's median norm, and the whole update to `clip_norm` if set (with shards, each
node's whole delta RMS first, `Robust.clip_round`); then judge the clipped updates on their reconstructed
ΔW_i = B_i A_i − B_g A_g (views.py) with a combine from COMBINES, per node and per module, and average the
kept updates' A and B module by module (or, with `exact=True`, apply the exact rule over them).

Clipping acts on parameters because parameters are what we average (and what DP noise is added to);
selection acts on ΔW because that is what the model sees: A and B are not linear in ΔW (scaling both by
2 scales ΔW by 4; (−A, −B) gives the same product), so outlier statistics on A and B separately miss
attacks and flag harmless reparametrisations. Clipping per module stops a node from spending its whole
norm budget on one module.

Decisions are made twice: per node over all modules (a node failing overall is rejected everywhere) and
per module (a node that poisons only one module loses only that module, instead of diluting its outlier
score over hundreds of honest-looking ones). A rejected node counts as absent: the clip bounds and the
module weights are computed again without it. With fewer than 3 updates there is no majority to judge
by: all are kept (caps and clipping still apply).

A new combine is a new file with `select(views, n, config) -> Selection` plus one line in COMBINES.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from coordinator import privacy
from coordinator.rules import krum, median, trimmed_mean
from coordinator.rules.base import Carry, Pool, Rule
from coordinator.rules.exact import Residual, fedex_mean
from coordinator.rules.toolkit import (
    AggregateConfig,
    AggregateReport,
    Module,
    Tensors,
    Update,
    capped_examples,
    clip_factors,
    clip_whole,
)
from coordinator.rules.views import Selection, Views, views

COMBINES: dict[str, Callable[[Views, int, AggregateConfig], Selection]] = {
    "trimmed_mean": trimmed_mean.select,
    "median": median.select,
    "krum": krum.select,
}


class Robust(Rule):
    name = "robust"

    def label(self) -> str:
        return f"robust/{self.config.combine}"

    def keeps_residual(self) -> bool:
        return self.config.exact

    def carry(self, scaling: float) -> Carry:
        return Residual(scaling) if self.config.exact else Carry()

    def examples(self, claimed: np.ndarray) -> np.ndarray:
        return capped_examples(claimed, self.config.max_examples, self.config.median_cap_factor)

    def clip(self, norms: np.ndarray) -> np.ndarray:
        """Per module at clip_factor × that module's median, then the whole update at clip_norm (dp.clip)."""
        factors = clip_factors(norms, self.config.clip_factor * np.median(norms, axis=0, keepdims=True))
        return clip_whole(norms, factors, self.config.dp.clip if self.config.dp else self.config.clip_norm)

    def select(self, g: Tensors, pool: Pool, mods: list[Module], rng: np.random.Generator,
               report: AggregateReport) -> Pool:
        """The nodes the combine keeps, each weighted per module by the combine and left out of the
        modules it failed in; the clip bounds are computed again without the rejected ones."""
        sel = self.judge(g, pool, mods, rng)
        nodes = [u.node_id for u in pool.updates]
        report.scores = {nid: float(s) for nid, s in zip(nodes, sel.score)}
        report.rejected.update(
            {nid: sel.reason.format(score=s) for nid, s, k in zip(nodes, sel.score, sel.keep) if not k}
        )
        if not sel.keep.all():
            # a rejected node must count as absent: its norm moved the clip bound and its coordinates
            # moved the per-module weights, which would tilt the average toward the honest node nearest it
            pool = pool.only(sel.keep)
            pool.factors = self.clip(pool.norms)
            report.clipped.update(
                {u.node_id: float(f) for u, f in zip(pool.updates, pool.factors.min(axis=1)) if f < 1.0}
            )
            again = self.judge(g, pool, mods, rng)
            sel = Selection(sel.score[sel.keep], np.ones(len(pool.updates), dtype=bool), again.module_keep,
                            again.module_weight, sel.reason)
        mask = sel.keep[:, None] & sel.module_keep
        pool.weights = pool.weights * mask * (1.0 if self.config.dp else sel.module_weight)
        report.excluded = {
            u.node_id: int((~row).sum())
            for u, row, k in zip(pool.updates, mask, sel.keep)
            if k and not row.all()
        }
        return pool.only(sel.keep)

    def judge(self, g: Tensors, pool: Pool, mods: list[Module], rng: np.random.Generator) -> Selection:
        """Score, keep and weight the clipped updates with the configured combine on their ΔW views."""
        n = len(pool.updates)
        if n < 3:
            ones = np.ones((n, len(mods)))
            return Selection(np.full(n, np.nan), np.ones(n, dtype=bool), ones.astype(bool), ones, "")
        tensors = [u.tensors for u in pool.updates]
        vs = views(g, tensors, pool.factors, mods, self.config.view_coords, rng)
        return COMBINES[self.config.combine](vs, n, self.config)

    def mean(self, g: Tensors, tensors: list[Tensors], weights: np.ndarray, factors: np.ndarray,
             mods: list[Module], report: AggregateReport) -> Tensors:
        if self.config.exact:
            return fedex_mean(g, tensors, weights, factors, mods, report)
        return super().mean(g, tensors, weights, factors, mods, report)

    def clip_round(self, global_tensors: Tensors, sent: dict[str, Update], expected: dict[str, list[str]],
                   report: AggregateReport) -> None:
        """With shards: bound each node's delta RMS (norm per parameter, so nodes with spans of different
        sizes compare) at `clip_factor` × the round's median, before keys are split into parts. A part may
        have only two trainers, and then no per-part rule can tell the liar from the honest node; across
        the whole round a ×50 or noise attacker is one outlier among many."""
        rms: dict[str, float] = {}
        sizes = {nid: sum(global_tensors[k].size for k in expected[nid]) for nid in sent}
        for nid, u in sent.items():
            with np.errstate(over="ignore", invalid="ignore"):
                total = sum(float(np.sum((u.tensors[k].astype(np.float64) - global_tensors[k]) ** 2))
                            for k in expected[nid])
            if math.isfinite(total) and sizes[nid]:
                rms[nid] = math.sqrt(total / sizes[nid])
        if len(rms) < 3:
            return
        bound = self.config.clip_factor * float(np.median(list(rms.values())))
        for nid, r in rms.items():
            if r > bound > 0:
                g = {k: np.asarray(global_tensors[k], dtype=np.float32) for k in expected[nid]}
                clipped = privacy.clip_update(g, sent[nid].tensors, bound * math.sqrt(sizes[nid]))
                if clipped is not None:  # not finite: `aggregate` rejects it with the reason
                    sent[nid] = Update(nid, clipped[0], sent[nid].num_examples)
                    report.clipped[nid] = min(clipped[1], report.clipped.get(nid, 1.0))
