"""trimmed_mean (robust's default combine): per coordinate, values outside the k-th smallest..k-th largest
are trimmed (k = max(1, ⌊trim_ratio·n⌋)).

Score = fraction of a node's coordinates kept, which is exactly its average share in the coordinate-wise
trimmed mean, and multiplies its weight. Kept when the score is at least min_kept_ratio × the median
score. A consistent outlier is trimmed almost everywhere.
"""

from __future__ import annotations

import numpy as np

from coordinator.rules.toolkit import AggregateConfig
from coordinator.rules.views import Selection, Views


def select(vs: Views, n: int, config: AggregateConfig) -> Selection:
    k = max(1, int(config.trim_ratio * n))
    per_module, sizes = [], []
    for v, scale in vs:
        srt = np.sort(v, axis=0)
        lo, hi = srt[k], srt[n - k - 1]  # ties at the bounds count as kept, so equal values are not trimmed
        per_module.append(((v >= lo) & (v <= hi)).mean(axis=1))
        sizes.append(scale * v.shape[1])
    frac = np.stack(per_module, axis=1)
    score = frac @ np.asarray(sizes) / sum(sizes)
    bar = config.min_kept_ratio * float(np.median(score))
    reason = f"trimmed-mean outlier: {{score:.0%}} of its ΔW coordinates kept, bar {bar:.0%}"
    module_keep = frac >= config.min_kept_ratio * np.median(frac, axis=0, keepdims=True)
    return Selection(score, score >= bar, module_keep, frac, reason)
