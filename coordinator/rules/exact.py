"""exact: FedEx-LoRA (Singhal et al. 2024), and the full-rank residual it carries across a campaign.

    >>> new, report = aggregate(global_tensors, updates, "exact")   # B̄, Ā + report.residuals
    >>> carry = create("exact").carry(scaling)       # per campaign: the residual summed over rounds
    >>> carry.absorb(report); carry.fold(model)      # W = W0 + scaling·R: the model the nodes averaged
    >>> published = carry.published(model, tensors)  # rank-r B', A' with B'A' ≈ B̄Ā + R (PEFT-loadable)

A and B are averaged as in fedavg, and the residual R = Σ w_i B_i A_i − B̄Ā of every module is returned
in `report.residuals` (prefix -> out×in, in units of B·A). B̄Ā + R equals the weighted mean of the
products exactly. We chose FedEx-LoRA over FLoRA stacking because the adapter keeps its rank: what we
publish stays a standard PEFT adapter with the campaign's lora_config, nodes keep the tensor shapes the
plan and `check_update` expect, and the upload does not grow with rounds × nodes. The cost is a
full-rank residual on the coordinator, which a published adapter cannot carry: that is why it is opt-in
rather than the default, and why central DP (which neither clips nor noises R) refuses it.

Summed over rounds R is the part of the average update the adapter's own rank cannot hold. During the
campaign the coordinator keeps it folded into its own copy of the frozen base weights, so every
evaluation (and the curve in the manifest) scores B̄Ā + R, the exact average of what the nodes learned.
Nodes receive only B̄, Ā and train on the untouched base: shipping a full-rank residual down every round
would cost more than the adapter itself (the FedEx-LoRA paper does ship it; we trade that for a constant
download). A published adapter must load with `PeftModel.from_pretrained` on the untouched base model,
so it cannot carry a full-rank delta: `project` replaces each module's (B̄, Ā) by the best rank-r
approximation of B̄Ā + R (truncated SVD, Eckart-Young), split as B' = U√S, A' = √S Vᵀ. The published
adapter is evaluated as published, and that score is the one the eval gate and the manifest use.
The residual is saved inside the round checkpoint as `residual.<prefix>` arrays (PREFIX).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coordinator.rules.base import Carry, Rule
from coordinator.rules.toolkit import (
    AggregateReport,
    Module,
    Tensors,
    clip_parameters,
    key_columns,
    modules,
    weighted_average,
)

Matrices = dict[str, np.ndarray]  # LoRA module prefix (PEFT state-dict naming) -> out × in, float32
PREFIX = "residual."  # how residual arrays are named inside the round checkpoint


class Exact(Rule):
    name = "exact"

    def keeps_residual(self) -> bool:
        return True

    def mean(self, g: Tensors, tensors: list[Tensors], weights: np.ndarray, factors: np.ndarray,
             mods: list[Module], report: AggregateReport) -> Tensors:
        return fedex_mean(g, tensors, weights, factors, mods, report)

    def carry(self, scaling: float) -> Carry:
        return Residual(scaling)


def fedex_mean(g: Tensors, tensors: list[Tensors], weights: np.ndarray, factors: np.ndarray,
               mods: list[Module], report: AggregateReport) -> Tensors:
    """B̄, Ā of the clipped updates, and their residual in `report.residuals` (also robust's `exact=True`)."""
    tensors = [clip_parameters(g, t, f, mods) for t, f in zip(tensors, factors)]
    new = weighted_average(g, tensors, {k: weights[:, j] for k, j in key_columns(mods).items()})
    report.residuals = fedex_residuals(tensors, report.module_weights, new)
    return new


# --- the products the nodes learned ------------------------------------------------------------------


def mean_product(tensors: list[Tensors], weights: np.ndarray | dict[str, np.ndarray]) -> Matrices:
    """Σ w_i B_i A_i per LoRA module (float64): what the nodes' models add to the base weights on average.
    `weights` is one vector for every module or a vector per module name."""
    out = {}
    for m in modules(sorted(tensors[0])):
        if m.lora:
            w = weights[m.name] if isinstance(weights, dict) else weights
            ka, kb = m.keys
            out[m.name] = sum(
                (
                    float(wi) * (t[kb].astype(np.float64) @ t[ka].astype(np.float64))
                    for t, wi in zip(tensors, w)
                ),
                start=np.zeros((tensors[0][kb].shape[0], tensors[0][ka].shape[1])),
            )
    return out


def fedex_residuals(
    tensors: list[Tensors], weights: np.ndarray | dict[str, np.ndarray], averaged: Tensors
) -> Matrices:
    """FedEx-LoRA residual per module: Σ w_i B_i A_i − B̄ Ā (float32, out×in)."""
    means = mean_product(tensors, weights)
    return {
        m.name: (
            means[m.name] - averaged[m.keys[1]].astype(np.float64) @ averaged[m.keys[0]].astype(np.float64)
        ).astype(np.float32)
        for m in modules(sorted(averaged))
        if m.lora
    }


def product_gap(
    tensors: list[Tensors],
    weights: np.ndarray | dict[str, np.ndarray],
    new: Tensors,
    residuals: Matrices | None = None,
) -> float:
    """Largest relative error, over modules, of B_new A_new (+ residual) vs Σ w_i B_i A_i.
    ~1e-7 for "exact"; for "fedavg" it is the cross-term error mean(B)mean(A) − mean(BA)."""
    worst = 0.0
    for name, want in mean_product(tensors, weights).items():
        m = next(m for m in modules(sorted(new)) if m.name == name)
        got = new[m.keys[1]].astype(np.float64) @ new[m.keys[0]].astype(np.float64)
        if residuals:
            got = got + residuals[name]
        worst = max(worst, float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)))
    return worst


# --- the residual across a campaign ------------------------------------------------------------------


class Residual(Carry):
    """The residual summed over rounds, folded into the model's base weights; W0 kept to undo it."""

    def __init__(self, scaling: float) -> None:
        self.scaling = scaling
        self.total: Matrices = {}
        self.originals: dict[str, Any] = {}  # W0 of every module the residual has touched

    def restore(self, saved: Tensors) -> Tensors:
        tensors, self.total = split_checkpoint(saved)
        return tensors

    def absorb(self, report: AggregateReport) -> None:
        if report.residuals:
            self.total = accumulate(self.total, report.residuals)

    def fold(self, model: Any) -> None:
        self.originals = snapshot(model, self.total, self.originals)
        apply(model, self.originals, self.total, self.scaling)

    def checkpoint(self, tensors: Tensors) -> Tensors:
        return join_checkpoint(tensors, self.total)

    def published(self, model: Any, tensors: Tensors) -> Tensors | None:
        if not self.total:
            return None
        apply(model, self.originals, {}, self.scaling)
        return project(tensors, self.total)


def accumulate(total: Matrices, new: Matrices) -> Matrices:
    out = {k: v.copy() for k, v in total.items()}
    for name, r in new.items():
        out[name] = out[name] + r if name in out else np.array(r, dtype=np.float32)
    return out


def _base_weight(model: Any, prefix: str) -> Any:
    """The frozen weight under the LoRA layer named by a state-dict prefix."""
    layer = model.get_submodule(prefix)
    return getattr(layer, "base_layer", layer).weight


def snapshot(model: Any, residual: Matrices, originals: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copies of the original base weights of the modules in `residual` (kept ones are not re-read)."""
    originals = dict(originals or {})
    for prefix in residual:
        if prefix not in originals:
            originals[prefix] = _base_weight(model, prefix).detach().clone()
    return originals


def apply(model: Any, originals: dict[str, Any], residual: Matrices, scaling: float) -> None:
    """Base weights := W0 + scaling·R (W0 again where R is empty)."""
    import torch

    with torch.no_grad():
        for prefix, w0 in originals.items():
            weight = _base_weight(model, prefix)
            r = residual.get(prefix)
            if r is None:
                weight.copy_(w0)
            else:
                weight.copy_(w0 + scaling * torch.from_numpy(np.asarray(r, dtype=np.float32)).to(w0.dtype))


def project(tensors: Tensors, residual: Matrices) -> Tensors:
    """Rank-r (B', A') per module with B'A' the closest rank-r matrix to BA + R; other keys unchanged."""
    out = dict(tensors)
    for m in modules(sorted(tensors)):
        if not m.lora or m.name not in residual:
            continue
        ka, kb = m.keys
        a, b = tensors[ka].astype(np.float64), tensors[kb].astype(np.float64)
        rank = a.shape[0]
        u, s, vt = np.linalg.svd(b @ a + residual[m.name].astype(np.float64), full_matrices=False)
        root = np.sqrt(s[:rank])
        out[kb] = (u[:, :rank] * root).astype(np.float32)
        out[ka] = (root[:, None] * vt[:rank]).astype(np.float32)
    return out


def split_checkpoint(saved: Tensors) -> tuple[Tensors, Matrices]:
    """(adapter tensors, residual) from the arrays of a round checkpoint."""
    tensors = {k: v for k, v in saved.items() if not k.startswith(PREFIX)}
    return tensors, {k.removeprefix(PREFIX): v for k, v in saved.items() if k.startswith(PREFIX)}


def join_checkpoint(tensors: Tensors, residual: Matrices) -> Tensors:
    return {**tensors, **{PREFIX + k: v for k, v in residual.items()}}
