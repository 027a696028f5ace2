"""The exact rule's residual: folded into the coordinator's base weights, re-projected to publish."""

from __future__ import annotations

import numpy as np

from coordinator.rules import Update, aggregate
from coordinator.rules.exact import accumulate, apply, join_checkpoint, project, snapshot, split_checkpoint
from modeling.load import load_base
from modeling.lora import get_state, set_state, wrap

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def test_projection_is_the_best_rank_r_approximation_of_the_exact_average() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 32)), rng.standard_normal((24, 4))
    residual = {PREFIX: rng.standard_normal((24, 32)).astype(np.float32) * 0.1}
    tensors = {f"{PREFIX}.lora_A.weight": a.astype(np.float32),
               f"{PREFIX}.lora_B.weight": b.astype(np.float32)}
    out = project(tensors, residual)
    want = b @ a + residual[PREFIX]
    got = out[f"{PREFIX}.lora_B.weight"] @ out[f"{PREFIX}.lora_A.weight"]
    s = np.linalg.svd(want, compute_uv=False)
    assert out[f"{PREFIX}.lora_A.weight"].shape == (4, 32)  # same rank: a standard PEFT adapter
    assert np.isclose(np.linalg.norm(want - got), np.sqrt((s[4:] ** 2).sum()), rtol=1e-4)  # Eckart-Young
    assert np.linalg.norm(want - got) < np.linalg.norm(want - b @ a)  # closer than dropping the residual


def test_folding_the_residual_makes_the_model_compute_the_exact_average_and_can_be_undone() -> None:
    import torch

    base, _ = load_base("tiny")
    model = wrap(base, {"r": 2, "alpha": 4, "seed": 1})
    g = get_state(model)
    rng = np.random.default_rng(1)
    updates = [Update(f"n{i}", {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.3
                                for k, v in g.items()}, 5)
               for i in range(3)]
    exact, report = aggregate(g, updates, "exact")
    total = accumulate({}, report.residuals)
    originals = snapshot(model, total)
    set_state(model, exact)
    apply(model, originals, total, 2.0)
    for prefix, w0 in originals.items():
        layer = model.get_submodule(prefix)
        effective = (layer.base_layer.weight
                     + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        products = [u.tensors[f"{prefix}.lora_B.weight"] @ u.tensors[f"{prefix}.lora_A.weight"]
                    for u in updates]
        want = w0 + 2.0 * torch.from_numpy(np.mean(products, axis=0))
        assert torch.allclose(effective, want, atol=1e-5)
    apply(model, originals, {}, 2.0)
    assert all(torch.equal(model.get_submodule(p).base_layer.weight, w) for p, w in originals.items())
    saved = join_checkpoint(exact, total)
    assert (split_checkpoint(saved)[1].keys() == total.keys()
            and split_checkpoint(saved)[0].keys() == exact.keys())
