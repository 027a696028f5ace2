"""Which updates a robust round uses, judged on what they do to the model: ΔW_i = B_i A_i − B_g A_g.

A and B are not linear in ΔW (scaling both by 2 scales ΔW by 4; (−A, −B) gives the same product), so
outlier statistics on A and B separately miss attacks and flag harmless reparametrisations. We judge the
reconstructed per-module ΔW_i (after clipping); `coordinator.aggregate` then averages the A and B of the
updates kept for each module (or applies the exact rule over them).

ΔW is out×in per module, far bigger than A and B, so each module is looked at through a "view": all of
its coordinates when out·in <= `coords`, else the exact ΔW entries on a grid of √coords rows × √coords
columns drawn with a per-round seed the nodes do not know in advance (B_i[rows] @ A_i[:, cols]). A view
is weighted by out·in / grid size, so sums over it estimate sums over the whole ΔW. Non-LoRA tensors are
modules of their own, viewed as their plain parameter delta.

Decisions are made twice: per node over all modules (a node failing overall is rejected everywhere) and
per module (a node that poisons only one module loses only that module, instead of diluting its outlier
score over hundreds of honest-looking ones). Rules:
- trimmed_mean: per coordinate, values outside the k-th smallest..k-th largest are trimmed
  (k = max(1, ⌊trim_ratio·n⌋)). Score = fraction of a node's coordinates kept, which is exactly its
  average share in the coordinate-wise trimmed mean, and multiplies its weight. Kept when the score is
  at least min_kept_ratio × the median score. A consistent outlier is trimmed almost everywhere.
- median: distance from the coordinate-wise median; kept up to outlier_factor × the median distance,
  and weighted by min(1, median distance / distance) (a Huber step), so a node that hides just inside
  the bar has little say.
- krum: Multi-Krum (Blanchard et al. 2017): score = sum of squared distances to the n−f−2 nearest
  others; the n−f lowest scores are kept.
With fewer than 3 updates there is no majority to judge by: all are kept (caps and clipping still apply).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

Tensors = dict[str, np.ndarray]
_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


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


def views(
    global_t: Tensors, tensors: list[Tensors], factors: np.ndarray, mods: list[Module], coords: int, rng
) -> Iterator[tuple[np.ndarray, float]]:
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


@dataclass(frozen=True)
class Selection:
    score: np.ndarray  # per node, over all modules; meaning depends on the rule
    keep: np.ndarray  # bool per node
    module_keep: np.ndarray  # bool, nodes × modules
    module_weight: np.ndarray  # multiplier on a node's weight, nodes × modules
    reason: str  # one-line rejection reason with a {score} placeholder


def trimmed_mean(
    vs: Iterator[tuple[np.ndarray, float]], n: int, trim_ratio: float, min_kept: float
) -> Selection:
    k = max(1, int(trim_ratio * n))
    per_module, sizes = [], []
    for v, scale in vs:
        srt = np.sort(v, axis=0)
        lo, hi = srt[k], srt[n - k - 1]  # ties at the bounds count as kept, so equal values are not trimmed
        per_module.append(((v >= lo) & (v <= hi)).mean(axis=1))
        sizes.append(scale * v.shape[1])
    frac = np.stack(per_module, axis=1)
    score = frac @ np.asarray(sizes) / sum(sizes)
    bar = min_kept * float(np.median(score))
    reason = f"trimmed-mean outlier: {{score:.0%}} of its ΔW coordinates kept, bar {bar:.0%}"
    module_keep = frac >= min_kept * np.median(frac, axis=0, keepdims=True)
    return Selection(score, score >= bar, module_keep, frac, reason)


def median(vs: Iterator[tuple[np.ndarray, float]], n: int, outlier_factor: float) -> Selection:
    d2, floor2 = [], []
    for v, scale in vs:
        med = np.median(v, axis=0)
        d2.append(scale * ((v - med) ** 2).sum(axis=1, dtype=np.float64))
        floor2.append(scale * float((med.astype(np.float64) ** 2).sum()))
    dist = np.sqrt(np.stack(d2, axis=1))
    # floors: when honest nodes agree exactly the median distance is 0 and float noise must not reject them
    floor = 1e-6 * np.sqrt(np.asarray(floor2)) + 1e-12
    score = np.sqrt((dist**2).sum(axis=1))
    bar = outlier_factor * float(np.median(score)) + 1e-6 * math.sqrt(sum(floor2)) + 1e-12
    typical = np.median(dist, axis=0, keepdims=True) + floor
    module_keep = dist <= outlier_factor * typical
    huber = np.minimum(1.0, typical / np.maximum(dist, 1e-300))  # farther than typical: less say
    reason = f"median outlier: ΔW distance {{score:.3g}} from the median, bar {bar:.3g}"
    return Selection(score, score <= bar, module_keep, huber, reason)


def krum(vs: Iterator[tuple[np.ndarray, float]], n: int, f: int | None) -> Selection:
    f = krum_f(n) if f is None else max(0, min(f, n - 3))
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


def select(
    rule: str,
    global_t: Tensors,
    tensors: list[Tensors],
    factors: np.ndarray,
    mods: list[Module],
    *,
    coords: int,
    rng: np.random.Generator,
    trim_ratio: float,
    min_kept_ratio: float,
    outlier_factor: float,
    byzantine: int | None,
) -> Selection:
    """Score, keep and weight the clipped updates with `rule` on their ΔW views."""
    n = len(tensors)
    if n < 3:
        ones = np.ones((n, len(mods)))
        return Selection(np.full(n, np.nan), np.ones(n, dtype=bool), ones.astype(bool), ones, "")
    vs = views(global_t, tensors, factors, mods, coords, rng)
    if rule == "trimmed_mean":
        return trimmed_mean(vs, n, trim_ratio, min_kept_ratio)
    if rule == "median":
        return median(vs, n, outlier_factor)
    return krum(vs, n, byzantine)
