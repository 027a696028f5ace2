"""One poisoned volunteer out of four on the real demo task (dates -> ISO 8601) with real LoRA training.

Four volunteers hold non-IID demo data (node i sees date style family i mod 3); each round every node
runs the node's own `node.worker.train_round` (PEFT + AdamW) from the global adapter with the instruction
`coordinator.rounds.train_instruction` builds, the coordinator plans with `coordinator.rounds.plan_round`,
decodes the replies as `check_reply` does and aggregates with `coordinator.rules.sharded.aggregate_sharded`
under the runner's own `aggregate_config`, then takes the campaign's default outer step
(`coordinator.outer.step`) as the runner does. Node 3 is the attacker (`tests/attack_client_app.poison`).
The eval is the held-out token cross-entropy of the answers on the demo test split (exact match stays 0
on a model this small, so it says nothing).

The model is the tests' "tiny" Llama with its (tied) embeddings scaled ×10: at the random init's 0.02
std no logit can exceed ~0.6, so no adapter could lower the loss much and "within 2 %" would be vacuous.
Training is deterministic, so a node's result is memoised on (node, round, keys, global tensors, its own
previous round): a volunteer keeps its AdamW state across rounds, so what it trained before counts too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from attack_client_app import poison
from conftest import MODEL_CACHE

from commons.demo_task import write_demo_data
from coordinator import outer
from coordinator.campaign import Campaign, LoraSpec, TrainSpec
from coordinator.plan import shard_keys
from coordinator.rounds import plan_round, train_instruction
from coordinator.rules import Update
from coordinator.rules.sharded import aggregate_sharded
from coordinator.runner import aggregate_config
from modeling.load import load_base
from modeling.lora import get_state, set_state, wrap
from node import worker
from node.train import collate, encode
from protocol.data.records import read_records
from protocol.signing.keys import verify_signature
from protocol.update import decode, update_digest

pytestmark = pytest.mark.slow  # about a minute of real training in all (memoised within the module)

NODES, ATTACKER, PER_NODE, TEST_SIZE = 4, 3, 16, 32
ROUNDS = 2
TRAIN = TrainSpec(steps=6, batch_size=2, lr=0.02, max_length=64)  # batch 2: half the CPU of 4 per example
ATTACKS = ("scale50", "sign_flip", "noise", "nan")
CAPS = {"device": "cpu", "vram_gb": None, "cpu_cores": 2, "ram_gb": 8.0}
Tensors = dict[str, np.ndarray]


@dataclasses.dataclass
class World:
    campaign: Campaign
    settings: list[worker.NodeSettings]
    init: Tensors
    eval_model: object
    eval_batches: list[dict]
    memo: dict = dataclasses.field(default_factory=dict)
    adam: dict = dataclasses.field(default_factory=dict)  # memo key -> the AdamW state the node kept after it
    results: dict = dataclasses.field(default_factory=dict)  # (attack, rule) -> final loss, for the table

    def loss(self, tensors: Tensors) -> float:
        """Mean token cross-entropy of the held-out answers (prompt tokens masked, as in training)."""
        if not all(np.isfinite(v).all() for v in tensors.values()):
            return math.nan
        set_state(self.eval_model, tensors)
        total = count = 0.0
        with torch.no_grad():
            for batch in self.eval_batches:
                n = float((batch["labels"][:, 1:] != -100).sum())
                total += float(self.eval_model(**batch).loss) * n
                count += n
        return total / count


def build_model(folder: Path) -> Path:
    base, tokenizer = load_base("tiny")
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(10.0)  # tied: the output embedding grows with it
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("poison-demo")
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's per-test env is not set yet
        mp.setenv("COMMONS_CACHE", os.environ.get("COMMONS_CACHE", str(MODEL_CACHE)))
        mp.setenv("COMMONS_HOME", str(root / "home"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the box is shared; one thread is also the deterministic choice
        model_dir = build_model(root / "model")
        data = write_demo_data(root / "data", NODES, PER_NODE, TEST_SIZE)
        campaign = Campaign(name="poison", base_model=str(model_dir), eval_file=data["test"],
                            base_revision="", rounds=ROUNDS, lora=LoraSpec(r=8, alpha=16), train=TRAIN)
        settings = [worker.NodeSettings(home=root / f"node{i}", data=path, threads=1)
                    for i, path in enumerate(data["train"])]
        for s in settings:
            s.home.mkdir(parents=True)
            # the scaled tiny model
            (s.home / "config.toml").write_text("[node_limits]\nallow_local_base = true\n")
        base, tokenizer = load_base(str(model_dir))
        eval_model = wrap(base, {**campaign.lora.__dict__})
        examples = [encode(tokenizer, r["messages"], TRAIN.max_length) for r in read_records(data["test"])]
        batches = [collate(examples[i:i + 8], tokenizer.pad_token_id) for i in range(0, len(examples), 8)]
        w = World(campaign, settings, get_state(eval_model), eval_model, batches)
        yield w
        torch.set_num_threads(threads)
    print_table(w)


def digest(tensors: Tensors) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(np.ascontiguousarray(tensors[k]).tobytes())
    return h.hexdigest()


def train_node(w: World, i: int, round_: int, keys: list[str], g: Tensors, before: tuple) -> tuple:
    """(node i's verified, decoded update or None when its training failed (the node drops out), the memo
    key, which the node's next round passes as `before`: its AdamW state is the one this round left)."""
    key = (i, round_, tuple(keys), digest(g), before)
    if key not in w.memo:
        config = train_instruction(w.campaign, round_, keys)
        home = str(w.settings[i].home)
        worker._OPTIMIZERS.pop(home, None)
        if w.adam.get(before):
            worker._OPTIMIZERS[home] = w.adam[before]
        try:
            wire, metrics, proof = worker.train_round(w.settings[i], config, g)
            digest_sent = update_digest(w.campaign.name, round_, wire)
            assert verify_signature(bytes.fromhex(proof["public_key"]), digest_sent,
                                    bytes.fromhex(proof["signature"]))
            sent = {k: g[k] for k in keys}
            w.memo[key] = Update(f"node{i}", decode(wire, sent, config.upload_dtype), metrics["num_examples"])
        except FloatingPointError:  # a global adapter wrecked by a naive rule makes training diverge
            w.memo[key] = None
        w.adam[key] = worker._OPTIMIZERS.get(home)
    return w.memo[key], key


def textbook_mean(g: Tensors, updates: list[Update]) -> Tensors:
    """Plain example-weighted mean with no checks at all: what "naive FedAvg" means in a paper."""
    total = sum(u.num_examples for u in updates)
    return {k: sum(u.tensors[k] * (u.num_examples / total) for u in updates) for k in g}


def run(w: World, rule: str, attack: str | None, nodes: int = NODES, shards: str = "none",
        min_coverage: int = 2) -> tuple[float, list]:
    """(final held-out loss, aggregation reports); node ATTACKER runs `attack` when it takes part."""
    campaign = dataclasses.replace(w.campaign, shards=shards, min_coverage=min_coverage)
    g, reports, moments = dict(w.init), [], {}
    names = [f"node{i}" for i in range(nodes)]
    before: dict[int, tuple] = {}  # each node's last memo key
    for round_ in range(1, ROUNDS + 1):
        plan = plan_round(campaign, sorted(g), {n: (j, CAPS) for j, n in enumerate(names)})
        updates = []
        for i, name in enumerate(names):
            keys = shard_keys(plan, name, sorted(g))
            rng = np.random.default_rng(round_)
            if attack == "absent" and i == ATTACKER:  # planned for, then sends nothing: the honest-only round
                continue
            if attack and i == ATTACKER:
                honest = None
                if attack in ("scale50", "sign_flip"):
                    honest, before[i] = train_node(w, i, round_, keys, g, before.get(i, ()))
                trained = honest.tensors if honest else {k: g[k] for k in keys}
                claimed = TRAIN.steps * TRAIN.batch_size  # what an honest node reports: it hides in the crowd
                updates.append(Update(name, poison(attack, g, trained, rng), claimed))
            else:
                u, before[i] = train_node(w, i, round_, keys, g, before.get(i, ()))
                updates += [u] if u else []
        if rule == "mean":
            with np.errstate(all="ignore"):
                g = textbook_mean(g, updates)
            if not all(np.isfinite(v).all() for v in g.values()):
                return math.nan, reports  # every node's next round fails: the campaign is dead
            continue
        with np.errstate(all="ignore"):
            new, report = aggregate_sharded(g, updates, plan, rule, aggregate_config(campaign)[1])
            g, moments = outer.step(g, new, moments, campaign.outer, report.unchanged)
        reports.append(report)
    with np.errstate(all="ignore"):
        return w.loss(g), reports


def record(w: World, attack: str, rule: str, loss: float) -> float:
    w.results[(attack, rule)] = loss
    return loss


def print_table(w: World) -> None:
    rules = [r for r in ("fedavg", "robust", "auto/cov2", "auto/cov3", "mean")
             if any(x == r for _, x in w.results)]
    print(f"\nheld-out answer loss after {ROUNDS} rounds; node {ATTACKER} of {NODES} malicious "
          "(honest-only: nodes 0-2 alone; auto/*: node 3 planned for but silent)")
    print(f"{'attack':<12}" + "".join(f"{r:>11}" for r in rules))
    for attack in dict.fromkeys(a for a, _ in w.results):
        cells = (f"{w.results[(attack, r)]:>11.4f}" if (attack, r) in w.results else " " * 11 for r in rules)
        print(f"{attack:<12}{''.join(cells)}")


@pytest.fixture(scope="module")
def base_loss(world: World) -> float:
    return record(world, "untrained", "fedavg", world.loss(world.init))


@pytest.fixture(scope="module")
def honest_fedavg(world: World) -> float:
    """The three honest nodes alone (no node 3), plain FedAvg."""
    return record(world, "honest-only", "fedavg", run(world, "fedavg", None, nodes=3)[0])


@pytest.fixture(scope="module")
def honest(world: World) -> float:
    """The reference for the robust rule: the three honest nodes alone under that same rule."""
    return record(world, "honest-only", "robust", run(world, "robust", None, nodes=3)[0])


def test_honest_training_clearly_lowers_the_held_out_loss(
    base_loss: float, honest_fedavg: float, honest: float
) -> None:
    assert honest_fedavg < 0.9 * base_loss and honest < 0.9 * base_loss, (base_loss, honest_fedavg, honest)


def refused_every_round(reports: list) -> bool:
    return len(reports) == ROUNDS and all("node3" in r.rejected or "node3" in r.clipped for r in reports)


@pytest.mark.parametrize("attack", ["scale50", "sign_flip", "noise", "nan"])
def test_default_robust_rule_stays_within_2_percent_of_honest_only(
    world: World, honest: float, base_loss: float, attack: str
) -> None:
    loss, reports = run(world, "robust", attack)
    record(world, attack, "robust", loss)
    assert refused_every_round(reports)  # the attacker is why: refused or clipped in every round
    assert abs(loss - honest) < 0.1 * (base_loss - honest)  # it keeps (almost) all of the gain
    assert loss == pytest.approx(honest, rel=0.02)


@pytest.mark.parametrize("attack", ["scale50", "sign_flip", "noise"])
def test_naive_fedavg_visibly_fails_the_same_test(world: World, honest_fedavg: float, attack: str) -> None:
    loss = record(world, attack, "fedavg", run(world, "fedavg", attack)[0])
    # "visibly": more than 5x the 2 % the robust rule is allowed, or a dead model
    assert not math.isfinite(loss) or loss > 1.10 * honest_fedavg


def test_nan_kills_a_textbook_mean_but_every_rule_of_ours_refuses_it(world: World,
                                                                     honest_fedavg: float) -> None:
    assert math.isnan(record(world, "nan", "mean", run(world, "mean", "nan")[0]))
    loss, reports = run(world, "fedavg", "nan")
    assert record(world, "nan", "fedavg", loss) == pytest.approx(honest_fedavg, rel=1e-6)
    assert all("NaN" in r.rejected["node3"] for r in reports)


@pytest.fixture(scope="module")
def honest_sharded(world: World) -> dict[int, float]:
    """Sharded reference: the same 4-node plan, node 3 planned for but silent (the honest nodes' round)."""
    return {cov: record(world, "honest-only", f"auto/cov{cov}",
                        run(world, "robust", "absent", shards="auto", min_coverage=cov)[0]) for cov in (2, 3)}


@pytest.mark.parametrize("attack", ["scale50", "sign_flip", "noise", "nan"])
def test_sharded_default_coverage_stays_within_2_percent_of_honest_only(
    world: World, honest_sharded: dict[int, float], base_loss: float, attack: str
) -> None:
    coverage = Campaign.__dataclass_fields__["min_coverage"].default  # the campaign default: 3
    loss, reports = run(world, "robust", attack, shards="auto", min_coverage=coverage)
    record(world, attack, f"auto/cov{coverage}", loss)
    assert refused_every_round(reports)
    assert loss == pytest.approx(honest_sharded[coverage], rel=0.02)


def test_two_trainers_per_layer_only_bound_the_damage(
    world: World, honest_sharded: dict[int, float], base_loss: float
) -> None:
    """With min_coverage = 2 a layer's two trainers cannot out-vote each other; the round-wide clip still
    keeps a ×50 attacker to 2× the median step, so most of the gain survives (why 3 is the default)."""
    loss, reports = run(world, "robust", "scale50", shards="auto", min_coverage=2)
    record(world, "scale50", "auto/cov2", loss)
    assert all("node3" in r.clipped for r in reports)
    assert loss - honest_sharded[2] < 0.5 * (base_loss - honest_sharded[2])
