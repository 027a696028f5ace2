"""The coordinator's outer optimizer: a round's aggregate is read as a step to take, not as the new adapter.

    >>> new, state = step(global_tensors, aggregated, state, OuterConfig("nesterov", lr=0.7, momentum=0.9),
    ...                   untouched=report.unchanged)
    >>> saved = join(new, state)        # the round checkpoint's arrays; split(saved) reads them back

Δ = aggregated − global is where the volunteers moved the adapter this round (the rule already chose
whom to trust; this only decides how far to go):

    none      new = aggregated                                          plain federated averaging
    nesterov  m ← μ·m + Δ;  new = global + lr·(Δ + μ·m)                 DiLoCo (Douillard et al., 2023)
    adam      m ← β1·m + (1 − β1)·Δ;  v ← β2·v + (1 − β2)·Δ²            FedAdam (Reddi et al., 2021),
              new = global + lr·m̂ / (√v̂ + eps)   (m̂, v̂ bias-corrected)   β1 = `momentum`

Nesterov at lr 1 and μ 0 is plain averaging. The idea: the average of volunteers who each fit their own
slice of the data moves less than any one of them (their private directions cancel), and momentum
re-applies what the rounds agree on. Measured (docs/federation.md, bench/bench_quality.py, 2 rounds):
it pays only while every volunteer restarts AdamW each round; with their AdamW state kept across rounds
(node/worker.py, the default) the extra step overshoots, so the default here is "none". Keys in
`untouched` (no accepted update covered them: a span nobody trained this round) keep the global value
and their state as it was: a round that says nothing about a key neither applies nor decays its momentum.

Everything here is a pure function over `dict[str, np.ndarray]`; the state is flat arrays named
"momentum.KEY", "variance.KEY" and "steps.KEY" (a round count per key, for Adam's bias correction).
The upload is unchanged: only the coordinator keeps this state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from protocol.errors import CommonsError

Tensors = dict[str, np.ndarray]
OPTIMIZERS = ("none", "nesterov", "adam")
PREFIX = "outer."  # how the state's arrays are named inside the round checkpoint
DEFAULT_LR = {"none": 1.0, "nesterov": 0.7, "adam": 1e-3}


@dataclass
class OuterConfig:
    """The `[outer]` table of a campaign file (coordinator/campaign.py checks its types and ranges)."""

    optimizer: str = "none"
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    momentum: float = 0.9  # nesterov's μ, adam's β1
    beta2: float = 0.99  # adam only
    eps: float = 1e-6  # adam only: below this a coordinate's step is damped, not blown up

    def check(self) -> None:
        """Raises CommonsError naming the choices for an unknown optimizer."""
        if self.optimizer not in OPTIMIZERS:
            raise CommonsError(f"outer optimizer {self.optimizer!r} is unknown: use one of "
                               f"{', '.join(OPTIMIZERS)}")

    @property
    def rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr


def step(global_tensors: Tensors, aggregated: Tensors, state: Tensors, config: OuterConfig,
         untouched: Iterable[str] = ()) -> tuple[Tensors, Tensors]:
    """(the new global adapter, the new state); nothing passed in is changed."""
    config.check()
    if config.optimizer == "none":
        return dict(aggregated), dict(state)
    skip = set(untouched)
    new: Tensors = {}
    out = dict(state)
    for key, g in global_tensors.items():
        if key in skip:
            new[key] = np.array(aggregated[key], dtype=np.float32)
            continue
        delta = np.asarray(aggregated[key], dtype=np.float32) - g
        if config.optimizer == "nesterov":
            move = _nesterov(key, delta, out, config)
        else:
            move = _adam(key, delta, out, config)
        new[key] = (g + move).astype(np.float32)
    return new, out


def _nesterov(key: str, delta: np.ndarray, state: Tensors, config: OuterConfig) -> np.ndarray:
    mu = config.momentum
    momentum = mu * state.get(f"momentum.{key}", 0.0) + delta
    state[f"momentum.{key}"] = momentum.astype(np.float32)
    return config.rate * (delta + mu * momentum)


def _adam(key: str, delta: np.ndarray, state: Tensors, config: OuterConfig) -> np.ndarray:
    b1, b2 = config.momentum, config.beta2
    t = float(state.get(f"steps.{key}", np.zeros(1))[0]) + 1
    m = b1 * state.get(f"momentum.{key}", 0.0) + (1 - b1) * delta
    v = b2 * state.get(f"variance.{key}", 0.0) + (1 - b2) * delta * delta
    state[f"momentum.{key}"] = m.astype(np.float32)
    state[f"variance.{key}"] = v.astype(np.float32)
    state[f"steps.{key}"] = np.array([t], dtype=np.float32)
    m_hat = m / (1 - b1**t) if b1 > 0 else m
    v_hat = v / (1 - b2**t) if b2 > 0 else v
    return config.rate * m_hat / (np.sqrt(v_hat) + config.eps)


def join(tensors: Tensors, state: Tensors) -> Tensors:
    """The arrays a round checkpoint saves: the adapter (and what a rule carries) plus the outer state."""
    return {**tensors, **{PREFIX + k: v for k, v in state.items()}}


def split(saved: Tensors) -> tuple[Tensors, Tensors]:
    """(everything else, the outer state) from a round checkpoint's arrays."""
    rest = {k: v for k, v in saved.items() if not k.startswith(PREFIX)}
    return rest, {k.removeprefix(PREFIX): v for k, v in saved.items() if k.startswith(PREFIX)}
