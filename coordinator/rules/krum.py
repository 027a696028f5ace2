"""krum: Multi-Krum (Blanchard et al. 2017): score = sum of squared distances to the n−f−2 nearest
others; the n−f lowest scores are kept (f = config.krum_f, or `krum_f(n)`)."""

from __future__ import annotations

import numpy as np

from coordinator.rules.toolkit import AggregateConfig
from coordinator.rules.views import Selection, Views


def select(vs: Views, n: int, config: AggregateConfig) -> Selection:
    f = krum_f(n) if config.krum_f is None else max(0, min(config.krum_f, n - 3))
    grams = [scale * (v.astype(np.float64) @ v.astype(np.float64).T) for v, scale in vs]
    score, keep = _multi_krum(sum(grams), f)
    module_keep = np.stack([_multi_krum(gm, f)[1] for gm in grams], axis=1)
    reason = f"multi-krum: score {{score:.3g}} among the {f} highest of {n}"
    return Selection(score, keep, module_keep, np.ones(module_keep.shape), reason)


def _multi_krum(gram: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    n = gram.shape[0]
    sq = np.diag(gram)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    score = np.array([np.sort(np.delete(dist[i], i))[: n - f - 2].sum() for i in range(n)])
    keep = np.zeros(n, dtype=bool)
    keep[np.argsort(score, kind="stable")[: n - f]] = True
    return score, keep


def krum_f(n: int) -> int:
    """Default number of Byzantine nodes Krum guards against: at least one, at most n − 3."""
    return max(0, min(max(1, (n - 3) // 2), n - 3))
