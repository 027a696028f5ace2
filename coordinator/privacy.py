"""Central differential privacy for the aggregate: the Gaussian mechanism and its RDP accountant.

    >>> eps, order = epsilon(noise_multiplier=1.0, rounds=10, delta=1e-5)

The coordinator clips every accepted update's parameter delta to `clip` (L2 over all its tensors), sums
them with equal weight, and adds N(0, (noise_multiplier * clip)^2) to every coordinate of the sum
(`coordinator.rules` does this when `AggregateConfig.dp` is set). With shards the clip is joint over
each node's whole upload and every part's sum gets its own noise (`clip_update`). One round is then a
(subsampled) Gaussian mechanism with sensitivity `clip`; R rounds compose in Rényi DP and convert to (ε, δ)
with ε = min_α RDP(α) + log(1/δ)/(α−1) (Mironov 2017, Prop. 3).

RDP of one round:
- full participation (q = 1): α / (2σ²), for any real α > 1;
- Poisson sampling with rate q < 1: the sampled Gaussian mechanism of Mironov, Talwar & Zhang (2019),
  evaluated exactly at integer orders α ≥ 2 by the binomial expansion
  A_α = Σ_k C(α,k) (1−q)^(α−k) q^k exp((k²−k)/(2σ²)),  RDP(α) = log(A_α)/(α−1).
  Using integer orders only is conservative: a minimum over fewer orders can only give a larger ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocol.errors import CommonsError

# Fine real orders for the closed form, integers for the sampled case (both as in TF Privacy / Opacus).
REAL_ORDERS: tuple[float, ...] = tuple(1.0 + x / 20.0 for x in range(1, 200)) + tuple(range(11, 257))
INT_ORDERS: tuple[int, ...] = tuple(range(2, 257))


@dataclass(frozen=True)
class DPConfig:
    """Central DP settings; `rounds` and `sampling_rate` only feed the reported (ε, δ)."""

    clip: float
    noise_multiplier: float
    delta: float = 1e-5
    rounds: int = 1
    sampling_rate: float = 1.0

    def check(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise CommonsError(f"DP clip must be a positive number, got {self.clip}; set dp.clip > 0")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise CommonsError(
                f"DP noise_multiplier must be > 0, got {self.noise_multiplier}; set dp.noise_multiplier > 0"
            )
        if not 0 < self.delta < 1:
            raise CommonsError(f"DP delta must be in (0, 1), got {self.delta}; use e.g. 1e-5")
        if self.rounds < 1:
            raise CommonsError(
                f"DP rounds must be >= 1, got {self.rounds}; pass the planned number of rounds"
            )
        if not 0 < self.sampling_rate <= 1:
            raise CommonsError(f"DP sampling_rate must be in (0, 1], got {self.sampling_rate}")


def rdp_gaussian(noise_multiplier: float, order: float) -> float:
    """RDP of one Gaussian mechanism with sensitivity 1 and std `noise_multiplier`: α / (2σ²)."""
    return order / (2.0 * noise_multiplier**2)


def rdp_sampled_gaussian(sampling_rate: float, noise_multiplier: float, order: int) -> float:
    """RDP at integer `order` of the Poisson-sampled Gaussian mechanism (binomial expansion, log space)."""
    q, s = sampling_rate, noise_multiplier
    if q >= 1.0:
        return rdp_gaussian(s, order)
    if q <= 0.0:
        return 0.0
    k = np.arange(order + 1, dtype=np.float64)
    log_binom = (
        math.lgamma(order + 1)
        - np.array([math.lgamma(x + 1) for x in k])
        - np.array([math.lgamma(order - x + 1) for x in k])
    )
    terms = log_binom + (order - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2.0 * s * s)
    top = float(terms.max())
    log_a = top + math.log(float(np.exp(terms - top).sum()))
    return max(log_a, 0.0) / (order - 1)


def epsilon(
    noise_multiplier: float, rounds: int, delta: float, sampling_rate: float = 1.0
) -> tuple[float, float]:
    """(ε, best order) after `rounds` compositions, for the given δ."""
    DPConfig(1.0, noise_multiplier, delta, rounds, sampling_rate).check()
    if sampling_rate >= 1.0:
        orders: tuple[float, ...] = REAL_ORDERS
        rdp = [rounds * rdp_gaussian(noise_multiplier, a) for a in orders]
    else:
        orders = tuple(float(a) for a in INT_ORDERS)
        rdp = [rounds * rdp_sampled_gaussian(sampling_rate, noise_multiplier, int(a)) for a in orders]
    eps = [r + math.log(1.0 / delta) / (a - 1.0) for r, a in zip(rdp, orders)]
    best = int(np.argmin(eps))
    return float(eps[best]), float(orders[best])


def add_noise(
    averaged: dict[str, np.ndarray], contributors: dict[str, int], config: DPConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The Gaussian mechanism on an equal-weight average: (Σ clipped deltas + N(0, (σC)²)) / count, i.e.
    std σC/count on each key's average (keys sorted, so a seed reproduces it). Keys nobody contributed
    to hold no one's data and stay as they are."""
    out = {}
    for k in sorted(averaged):
        v, count = averaged[k], contributors[k]
        if count == 0:
            out[k] = v
            continue
        std = np.float32(config.noise_multiplier * config.clip / count)
        out[k] = v + rng.standard_normal(v.shape, dtype=np.float32) * std
    return out


def clip_update(
    global_t: dict[str, np.ndarray], tensors: dict[str, np.ndarray], clip: float
) -> tuple[dict[str, np.ndarray], float] | None:
    """One node's whole upload (every key it sent, whatever parts they are aggregated in) with its delta
    scaled to L2 norm <= `clip` jointly, and the factor used; None when the delta is not finite.

    Sharded campaigns (`coordinator.rules.sharded.aggregate_sharded`) aggregate each node's keys in several
    parts. Clipping each part to `clip` separately would let a node spanning k parts move the aggregate
    by up to sqrt(k)·clip; clipping the whole upload once bounds its total influence by `clip`, so the
    concatenation of the parts' noised sums is one Gaussian mechanism with sensitivity `clip` and the
    accountant above applies unchanged."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for k, x in tensors.items():
            d = (np.asarray(x, dtype=np.float32) - global_t[k]).reshape(-1).astype(np.float64)
            total += float(np.dot(d, d))
    if not math.isfinite(total):
        return None
    norm = math.sqrt(total)
    factor = 1.0 if norm <= clip else clip / norm
    if factor == 1.0:
        return dict(tensors), 1.0
    f = np.float32(factor)
    return {k: global_t[k] + f * (np.asarray(x, dtype=np.float32) - global_t[k])
            for k, x in tensors.items()}, factor


def report(config: DPConfig, participants: int) -> dict:
    """What a round's report says about privacy: the mechanism and the (ε, δ) after all planned rounds."""
    eps, order = epsilon(config.noise_multiplier, config.rounds, config.delta, config.sampling_rate)
    return {
        "epsilon": eps,
        "delta": config.delta,
        "order": order,
        "noise_multiplier": config.noise_multiplier,
        "clip": config.clip,
        "rounds": config.rounds,
        "sampling_rate": config.sampling_rate,
        "noise_std": config.noise_multiplier * config.clip,
        "participants": participants,
    }
