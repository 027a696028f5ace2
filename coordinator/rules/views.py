"""What robust selection looks at: each update's clipped ΔW_i = B_i A_i − B_g A_g, module by module.

ΔW is out×in per module, far bigger than A and B, so each module is looked at through a "view": all of
its coordinates when out·in <= `coords`, else the exact ΔW entries on a grid of √coords rows × √coords
columns drawn with a per-round seed the nodes do not know in advance (B_i[rows] @ A_i[:, cols]). A view
is weighted by out·in / grid size, so sums over it estimate sums over the whole ΔW. Non-LoRA tensors are
modules of their own, viewed as their plain parameter delta.

A combine (trimmed_mean.py, median.py, krum.py) turns the views into a `Selection`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from coordinator.rules.toolkit import Module, Tensors

Views = Iterator[tuple[np.ndarray, float]]  # per module: (V, scale), V[i] = node i's view (n × s float32)


@dataclass(frozen=True)
class Selection:
    score: np.ndarray  # per node, over all modules; meaning depends on the combine
    keep: np.ndarray  # bool per node
    module_keep: np.ndarray  # bool, nodes × modules
    module_weight: np.ndarray  # multiplier on a node's weight, nodes × modules
    reason: str  # one-line rejection reason with a {score} placeholder


def views(
    global_t: Tensors, tensors: list[Tensors], factors: np.ndarray, mods: list[Module], coords: int, rng
) -> Views:
    """Per module: (V, scale), V[i] = view of node i's clipped ΔW (n × s float32); factors is n × modules."""
    n = len(tensors)
    for j, mod in enumerate(mods):
        c = factors[:, j].astype(np.float32)
        if not mod.lora:
            g = global_t[mod.keys[0]].reshape(-1)
            idx = slice(None) if g.size <= coords else rng.choice(g.size, size=coords, replace=False)
            d = np.stack([t[mod.keys[0]].reshape(-1)[idx] for t in tensors]) - g[idx]
            yield d * c[:, None], g.size / d.shape[1]
            continue
        ka, kb = mod.keys
        a_g, b_g = global_t[ka], global_t[kb]
        out, inn = b_g.shape[0], a_g.shape[1]
        rows: slice | np.ndarray = slice(None)
        cols: slice | np.ndarray = slice(None)
        if out * inn > coords:  # a grid gathers 2·m·r values per node instead of touching all of A and B
            m = max(1, math.isqrt(coords))
            rows = np.sort(rng.choice(out, size=min(out, m), replace=False))
            cols = np.sort(rng.choice(inn, size=min(inn, m), replace=False))
        b_s, a_s = b_g[rows], a_g[:, cols]
        b = b_s + c[:, None, None] * (np.stack([t[kb][rows] for t in tensors]) - b_s)  # clip the parameters
        a = a_s + c[:, None, None] * (np.stack([t[ka][:, cols] for t in tensors]) - a_s)
        v = np.matmul(b, a).reshape(n, -1) - (b_s @ a_s).reshape(1, -1)
        yield v, out * inn / v.shape[1]
