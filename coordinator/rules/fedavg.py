"""fedavg: A and B averaged separately, weighted by num_examples.

mean(B)·mean(A) ≠ mean(B·A), so the aggregate is not the average of what the nodes learned
(`exact.product_gap` measures by how much; `exact.py` closes the gap). Nothing is capped, clipped or
selected: it trusts every volunteer, and still refuses NaN. With central DP (`config.dp`) it runs the
shared pipeline instead: each update clipped to dp.clip as a whole, equal weights, Gaussian noise.
"""

from __future__ import annotations

import math

import numpy as np

from coordinator.rules.base import Rule
from coordinator.rules.toolkit import (
    AggregateReport,
    Tensors,
    Update,
    drop_nonfinite,
    module_norms,
    modules,
    unchanged,
    weighted_average,
)


class FedAvg(Rule):
    name = "fedavg"

    def combine(self, g: Tensors, ok: list[Update],
                report: AggregateReport) -> tuple[Tensors, AggregateReport]:
        if self.config.dp is None:
            return fedavg_fast(g, ok, report)
        return super().combine(g, ok, report)


def fedavg_fast(g: Tensors, ok: list[Update], report: AggregateReport) -> tuple[Tensors, AggregateReport]:
    """Plain weighted average. A non-finite input always makes the result non-finite (NaN·0 is NaN), so
    the result is checked once and the updates only looked at one by one when it is not finite."""
    if ok:
        weights = np.array([u.num_examples for u in ok], dtype=np.float64)
        weights /= weights.sum()
        with np.errstate(over="ignore", invalid="ignore"):
            new = weighted_average(g, [u.tensors for u in ok], weights)
            finite = all(math.isfinite(float(np.dot(v.reshape(-1), v.reshape(-1)))) for v in new.values())
        if not finite:
            mods = modules(sorted(g))
            norms = np.array([module_norms(g, u.tensors, mods) for u in ok])
            finite_ok, _ = drop_nonfinite(ok, norms, report)
            if len(finite_ok) == len(ok):  # finite inputs whose sum overflows: nothing sane to publish
                report.rejected.update({u.node_id: "values so large the average overflows" for u in ok})
                return unchanged(g, report)
            return fedavg_fast(g, finite_ok, report)
        report.accepted = [u.node_id for u in ok]
        report.weights = {u.node_id: float(w) for u, w in zip(ok, weights)}
        return new, report
    return unchanged(g, report)
