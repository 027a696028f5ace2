"""A malicious volunteer in a real network: Flower SuperLink + 4 SuperNodes, tiny model, 2 rounds.

Node 3 trains honestly, multiplies its update by 50 and signs it with its own registered key
(tests/attack_client_app.py), so the signature verifies and only the default robust aggregation can
stop it. The campaign must complete and publish, the coordinator's events must say why node 3 did not
count, and the published adapter must stay near what the honest nodes alone produce.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from attack_client_app import poison_wire
from safetensors.numpy import load_file
from test_federation_e2e import TestNetwork, ended, start, wait_for

from commons.demo_task import write_demo_data
from coordinator.campaign import load
from coordinator.rounds import train_instruction
from coordinator.rules import Update, aggregate
from modeling.load import load_base
from modeling.lora import get_state, wrap
from node import worker
from protocol.signing.keys import Identity
from protocol.update import SCALE, decode, encode

ROUNDS, ATTACKER = 1, 3  # one round keeps the suite short; the in-process test runs two


def write_campaign(root: Path) -> tuple[Path, list[Path]]:
    # the campaign defaults an open network runs: robust rule, shards = "auto" with 3 trainers per layer
    data = write_demo_data(root / "data", 4, 8, 4)
    path = root / "campaign.toml"
    path.write_text(
        f'name = "life"\nbase_model = "tiny"\neval_file = "{data["test"]}"\nrounds = {ROUNDS}\n'
        'min_nodes = 4\neval_size = 4\nround_timeout = 120\nnode_wait = 120\nupload_dtype = "int8"\n'
        "[train]\nsteps = 2\nbatch_size = 2\nmax_length = 48\n"
    )
    return path, data["train"]


def honest_reference(campaign_file: Path, data: list[Path], root: Path) -> dict[str, np.ndarray]:
    """The same campaign run in-process by the three honest nodes alone (whole adapter, plain FedAvg)."""
    campaign = load(campaign_file)
    base, _ = load_base(campaign.base_model)
    g = get_state(wrap(base, {**campaign.lora.__dict__}))
    keys = sorted(g)
    for round_ in range(1, ROUNDS + 1):
        updates = []
        for i in range(3):
            home = root / f"ref{i}"
            home.mkdir(parents=True, exist_ok=True)
            config = train_instruction(campaign, round_, keys)
            wire, metrics, _ = worker.train_round(worker.NodeSettings(home, data[i], threads=1), config, g)
            updates.append(Update(f"n{i}", decode(wire, g, campaign.upload_dtype), metrics["num_examples"]))
        g, _ = aggregate(g, updates, "fedavg")
    return g


def norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in b)))


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_the_attacker_re_encodes_its_poison_in_the_campaigns_upload_dtype(dtype: str) -> None:
    rng = np.random.default_rng(0)
    sent = {"a.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float32),
            "a.lora_B.weight": rng.normal(size=(16, 4)).astype(np.float32)}
    wire = encode({k: v + np.float32(0.01) * rng.normal(size=v.shape).astype(np.float32)
                   for k, v in sent.items()},
                  sent, dtype)
    honest = decode(wire, sent, dtype)
    scaled = poison_wire("scale50", wire, sent, dtype, rng)
    assert {k: v.dtype for k, v in scaled.items()} == {k: v.dtype for k, v in wire.items()}
    got = decode(scaled, sent, dtype)  # the coordinator decodes it like any honest reply
    for k, v in sent.items():
        want = 50 * (honest[k] - v)
        assert np.allclose(got[k] - v, want, atol=0.02 * np.abs(want).max())
    poisoned = decode(poison_wire("nan", wire, sent, dtype, rng), sent, dtype)
    assert all(np.isnan(v).all() for v in poisoned.values())
    if dtype == "int8":  # int8 cannot hold NaN: the attacker puts it in the float32 scale
        assert all(np.isnan(v).all() for k, v in poison_wire("nan", wire, sent, dtype, rng).items()
                   if k.startswith(SCALE))


@pytest.mark.slow  # four SuperNodes, each loading torch: about a minute, more on a loaded machine
def test_a_validly_signed_scaled_update_is_stopped_and_the_campaign_publishes(tmp_path: Path) -> None:
    campaign, data = write_campaign(tmp_path)
    keys = [Identity.load_or_create(tmp_path / f"node{i}" / "identity" / "ed25519.key").public_hex
            for i in range(4)]
    attacker = keys[ATTACKER]
    net = TestNetwork(tmp_path / "net")
    try:
        start(net, tmp_path, data, attack={ATTACKER: "scale50"})
        net.submit({"campaign": str(campaign), "home": str(tmp_path / "coord")})
        log = wait_for(tmp_path, ended, 300)
    finally:
        net.close()

    # its signature verified: the update arrived and was decoded every round, nothing was dropped
    assert not [e for e in log if e["event"] == "update_dropped"]
    assert sorted(e["round"] for e in log if e["event"] == "update" and e["node"] == attacker[:16]) == [1]
    ends = [e for e in log if e["event"] == "round_end"]
    assert [e["round"] for e in ends] == [1]
    for e in ends:  # ... and the aggregation refused or clipped it, saying why
        why = e["rejected_nodes"].get(attacker) or e["clipped"].get(attacker)
        assert why, e
        assert not set(e["rejected_nodes"]) - {attacker}  # no honest node paid for it
        if attacker in e["rejected_nodes"]:
            assert "outlier" in why
        else:
            assert why < 0.1  # clipped to at most a tenth of what it sent
    result = json.loads((tmp_path / "coord" / "campaigns" / "life" / "result.json").read_text())
    assert result["published"] and any(e["event"] == "published" for e in log)

    published = load_file(str(Path(result["adapter_dir"]) / "adapter_model.safetensors"))
    base, _ = load_base("tiny")
    init = get_state(wrap(base, {**load(campaign).lora.__dict__}))
    reference = honest_reference(campaign, data, tmp_path)
    assert set(published) == set(init) and all(np.isfinite(v).all() for v in published.values())
    moved, honest_moved = norm(published, init), norm(reference, init)
    print(f"\nadapter moved {moved:.4f} from init; honest-only reference {honest_moved:.4f}")
    assert 0 < moved <= 2 * honest_moved
