"""median: distance from the coordinate-wise median; kept up to outlier_factor × the median distance.

A kept node is weighted by min(1, median distance / distance) (a Huber step), so a node that hides just
inside the bar has little say.
"""

from __future__ import annotations

import math

import numpy as np

from coordinator.rules.toolkit import AggregateConfig
from coordinator.rules.views import Selection, Views


def select(vs: Views, n: int, config: AggregateConfig) -> Selection:
    d2, floor2 = [], []
    for v, scale in vs:
        med = np.median(v, axis=0)
        d2.append(scale * ((v - med) ** 2).sum(axis=1, dtype=np.float64))
        floor2.append(scale * float((med.astype(np.float64) ** 2).sum()))
    dist = np.sqrt(np.stack(d2, axis=1))
    # floors: when honest nodes agree exactly the median distance is 0 and float noise must not reject them
    floor = 1e-6 * np.sqrt(np.asarray(floor2)) + 1e-12
    score = np.sqrt((dist**2).sum(axis=1))
    bar = config.outlier_factor * float(np.median(score)) + 1e-6 * math.sqrt(sum(floor2)) + 1e-12
    typical = np.median(dist, axis=0, keepdims=True) + floor
    module_keep = dist <= config.outlier_factor * typical
    huber = np.minimum(1.0, typical / np.maximum(dist, 1e-300))  # farther than typical: less say
    reason = f"median outlier: ΔW distance {{score:.3g}} from the median, bar {bar:.3g}"
    return Selection(score, score <= bar, module_keep, huber, reason)
