"""The exact rule's full-rank residual: kept in the coordinator's base weights, re-projected to publish.

    >>> originals = snapshot(model, residual)          # W0 of every module the residual touches
    >>> apply(model, originals, residual, scaling)     # W = W0 + scaling·R: the model the nodes averaged
    >>> published = project(tensors, residual)         # rank-r B', A' with B'A' ≈ B̄Ā + R (PEFT-loadable)

FedEx-LoRA (`aggregate(..., "exact")`) returns R = Σ w_i B_i A_i − B̄Ā per module each round; summed over
rounds it is the part of the average update the adapter's own rank cannot hold. During the campaign the
coordinator keeps it folded into its own copy of the frozen base weights, so every evaluation (and the
curve in the manifest) scores B̄Ā + R, the exact average of what the nodes learned. Nodes receive only
B̄, Ā and train on the untouched base: shipping a full-rank residual down every round would cost more
than the adapter itself (the FedEx-LoRA paper does ship it; we trade that for a constant download).
A published adapter must load with `PeftModel.from_pretrained` on the untouched base model, so it
cannot carry a full-rank delta: `project` replaces each module's (B̄, Ā) by the best rank-r
approximation of B̄Ā + R (truncated SVD, Eckart-Young), split as B' = U√S, A' = √S Vᵀ. The published
adapter is evaluated as published, and that score is the one the eval gate and the manifest use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coordinator.robust import modules

Residual = dict[str, np.ndarray]  # LoRA module prefix (PEFT state-dict naming) -> out × in, float32
PREFIX = "residual."  # how residual arrays are named inside the round checkpoint


def accumulate(total: Residual, new: Residual) -> Residual:
    out = {k: v.copy() for k, v in total.items()}
    for name, r in new.items():
        out[name] = out[name] + r if name in out else np.array(r, dtype=np.float32)
    return out


def _base_weight(model: Any, prefix: str) -> Any:
    """The frozen weight under the LoRA layer named by a state-dict prefix."""
    layer = model.get_submodule(prefix)
    return getattr(layer, "base_layer", layer).weight


def snapshot(model: Any, residual: Residual, originals: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copies of the original base weights of the modules in `residual` (kept ones are not re-read)."""
    originals = dict(originals or {})
    for prefix in residual:
        if prefix not in originals:
            originals[prefix] = _base_weight(model, prefix).detach().clone()
    return originals


def apply(model: Any, originals: dict[str, Any], residual: Residual, scaling: float) -> None:
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


def project(tensors: dict[str, np.ndarray], residual: Residual) -> dict[str, np.ndarray]:
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


def split_checkpoint(saved: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Residual]:
    """(adapter tensors, residual) from the arrays of a round checkpoint."""
    tensors = {k: v for k, v in saved.items() if not k.startswith(PREFIX)}
    return tensors, {k.removeprefix(PREFIX): v for k, v in saved.items() if k.startswith(PREFIX)}


def join_checkpoint(tensors: dict[str, np.ndarray], residual: Residual) -> dict[str, np.ndarray]:
    return {**tensors, **{PREFIX + k: v for k, v in residual.items()}}
