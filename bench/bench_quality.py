"""Federated vs centralized fine-tuning at equal compute: does a federation learn as well as one machine?

    python -m bench quality                 # `make bench`: SmolLM2-135M, 2 tasks, 2 seeds (~25 min)
    python bench/bench_quality.py tiny      # the tiny model, 1 task, 1 seed (tests/test_quality.py)
    python bench/bench_quality.py ablate    # docs/federation.md's table: one factor at a time (SmolLM2)

Each task (commons/demo_task.py: dates to ISO; commons/clock_task.py: times to 24-hour) is split non-IID
over `nodes` volunteers (volunteer i sees style family i) and trained three ways from the same LoRA init:

    federated        runner.run over an in-process grid: the real ClientApp, worker, plan, rules and
                     outer step; `rounds` rounds of `steps` steps × `batch_size` per volunteer
    central compute  node.train.train on the union of the volunteers' data: nodes·rounds·steps steps ×
                     batch_size (the same examples and the same compute, one machine, sequential)
    central steps    rounds·steps steps × nodes·batch_size (the same examples, compute and sequential
                     steps: what synchronous data parallelism would do)

and scored on `eval_size` held-out records of all styles: accuracy is greedy exact match computed
teacher-forced (every answer token and the end-of-turn token is the argmax given the gold prefix, which
is what greedy decoding produces), loss is the cross-entropy of those same tokens. Reported: federated ÷
central for both references, per task and seed, their mean and spread (min-max) over seeds. The headline
`ratio` is the accuracy ratio against "central compute", mean over tasks and seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from commons import clock_task, demo_task
from coordinator import outer, runner
from coordinator.campaign import parse
from coordinator.rules import exact
from modeling.load import load_base
from modeling.lora import get_state, set_state, wrap
from node import client_app, worker
from node.train import TrainConfig, collate, encode, train
from protocol.signing.keys import Identity

TASKS: dict[str, ModuleType] = {"dates": demo_task, "clock": clock_task}


@dataclass(frozen=True)
class Setup:
    """One comparison: the task split, the federation's shape and the campaign keys it runs with."""

    model: str = "smollm2"
    tasks: tuple[str, ...] = ("dates", "clock")
    seeds: tuple[int, ...] = (0, 1)
    nodes: int = 3
    rounds: int = 2
    steps: int = 4  # per volunteer per round
    batch_size: int = 4
    lr: float = 2e-3
    max_length: int = 96
    per_node: int = 64  # training records per volunteer
    eval_size: int = 200
    iid: bool = False  # every volunteer sees every style family (the control for non-IID)
    fresh_optimizer: bool = False  # drop each volunteer's AdamW state before every round (the old way)
    campaign: dict[str, Any] = field(default_factory=dict)  # campaign keys over the defaults
    references: bool = True  # also train the two centralized references


class InProcessGrid:
    """Flower's Grid with honest volunteers in this process: each message goes straight to the installed
    ClientApp functions (node.client_app), only Flower's transport is left out."""

    def __init__(self, homes: list[Path], data: list[Path], fresh_optimizer: bool = False) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp run
        self.homes, self.data, self.fresh_optimizer = homes, data, fresh_optimizer

    def get_node_ids(self) -> list[int]:
        return [100 + i for i in range(len(self.homes))]

    def send_and_receive(self, messages: list[Any], timeout: float) -> list[Any]:
        return [self.deliver(m) for m in messages]

    def deliver(self, msg: Any) -> Any:
        from flwr.app import Context, RecordDict

        i = msg.metadata.dst_node_id - 100
        config = {"home": str(self.homes[i]), "data": str(self.data[i]), "threads": 1}
        context = Context(1, msg.metadata.dst_node_id, config, RecordDict(), {})
        kind = msg.metadata.message_type
        if kind == "train" and self.fresh_optimizer:
            worker.forget_optimizers()
        handlers = {"query": client_app.query, "query.ended": client_app.ended, "train": client_app.train}
        return handlers[kind](msg, context)


def split(setup: Setup, task: str, seed: int) -> tuple[list[list[dict]], list[dict]]:
    """(each volunteer's training records, the held-out records): non-IID unless `setup.iid`."""
    module = TASKS[task]
    families = list(module.STYLES)
    nodes = []
    for i in range(setup.nodes):
        mine = families if setup.iid else [families[i % len(families)]]
        nodes.append(module.make_records(setup.per_node, mine, 100 * seed + 1 + i))
    return nodes, module.make_records(setup.eval_size, families, 1000)


def federated(setup: Setup, task: str, seed: int, nodes: list[list[dict]], held_out: list[dict],
              folder: Path) -> dict[str, np.ndarray]:
    """The last round's global adapter of a real campaign over an in-process grid."""
    files = [demo_task.write_jsonl(folder / "data" / f"node{i}.jsonl", r) for i, r in enumerate(nodes)]
    eval_file = demo_task.write_jsonl(folder / "data" / "eval.jsonl", held_out[:4])  # the runner's own eval
    raw = {
        "name": f"quality-{task}", "base_model": setup.model, "eval_file": str(eval_file),
        "rounds": setup.rounds, "min_nodes": setup.nodes, "node_wait": 60, "eval_size": 4,
        "publish_margin": 1.0,
        "lora": {"r": 8, "alpha": 16, "seed": seed},
        "train": {"steps": setup.steps, "batch_size": setup.batch_size, "lr": setup.lr,
                  "max_length": setup.max_length},
        **setup.campaign,
    }
    campaign = parse(raw, folder)
    homes = [folder / f"node{i}" for i in range(setup.nodes)]
    for i, home in enumerate(homes):  # keys decide the shard plan: the same ones for every variant of a seed
        Identity.from_seed(hashlib.sha256(f"bench-quality {seed} {i}".encode()).digest()).save(
            home / "identity" / "ed25519.key")
    grid = InProcessGrid(homes, files, setup.fresh_optimizer)
    runner.run(grid, campaign, folder / "coordinator")
    saved = folder / "coordinator" / "campaigns" / campaign.name / "checkpoint"
    from safetensors.numpy import load_file

    weights = json.loads((saved / "state.json").read_text())["weights"]
    worker.forget_optimizers()  # the next campaign starts its volunteers afresh
    tensors, residual = exact.split_checkpoint(outer.split(load_file(str(saved / weights)))[0])
    return exact.project(tensors, residual) if residual else tensors  # the exact rule publishes this


def centralized(setup: Setup, model: Any, tokenizer: Any, init: dict[str, np.ndarray], records: list[dict],
                seed: int, steps: int, batch_size: int) -> dict[str, np.ndarray]:
    """One machine on the union of the volunteers' data, from the same init and with the data order of
    the volunteers' first round (seed + 1): one volunteer for one round is exactly this run."""
    set_state(model, init)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=setup.lr, max_length=setup.max_length,
                         seed=seed + 1)
    return train(model, tokenizer, records, config).state


def score(model: Any, tokenizer: Any, records: list[dict], max_length: int, batch: int = 20) -> dict:
    """Teacher-forced greedy exact match and answer cross-entropy over the answer and end-of-turn tokens."""
    examples = [encode(tokenizer, r["messages"], max_length) for r in records]
    hits, total, count = 0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            inputs = collate(examples[start : start + batch], tokenizer.pad_token_id)
            labels = inputs.pop("labels")[:, 1:]
            logits = model(**inputs).logits[:, :-1].float()
            eos = labels == tokenizer.eos_token_id
            answer = (labels != -100) & ~((eos.cumsum(1) - eos.int()) > 0)  # up to the first end-of-turn
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0),
                                                       reduction="none")
            total += float(losses[answer].sum())
            count += int(answer.sum())
            hits += int(((logits.argmax(-1) == labels) | ~answer).all(1).sum())
    return {"accuracy": hits / len(examples), "loss": total / max(count, 1)}


def compare(setup: Setup, task: str, seed: int, work: Path, known: dict | None = None) -> dict:
    """One task and seed: the federated run and the two centralized references, scored on the held-out
    records. `known` caches the references by what they depend on (an ablation trains them once)."""
    known = {} if known is None else known
    nodes, held_out = split(setup, task, seed)
    base, tokenizer = load_base(setup.model)
    model = wrap(base, {"r": 8, "alpha": 16, "seed": seed})  # the init the campaign's nodes start from
    init = get_state(model)
    row: dict[str, Any] = {"task": task, "seed": seed}
    start = time.perf_counter()
    set_state(model, federated(setup, task, seed, nodes, held_out, work / f"{task}-{seed}"))
    row["federated"] = score(model, tokenizer, held_out, setup.max_length)
    per_round = setup.rounds * setup.steps
    runs = {"central_compute": (setup.nodes * per_round, setup.batch_size),
            "central_steps": (per_round, setup.nodes * setup.batch_size)}
    for name, (steps, batch) in runs.items() if setup.references else ():
        # an IID split's union holds the same style mixture: its references are the non-IID ones
        key = json.dumps([setup.model, task, seed, setup.nodes, setup.per_node, setup.lr, name, steps, batch])
        if key not in known:
            union = split(replace(setup, iid=False), task, seed)[0]
            tensors = centralized(setup, model, tokenizer, init, [r for rs in union for r in rs], seed, steps,
                                  batch)
            set_state(model, tensors)
            known[key] = score(model, tokenizer, held_out, setup.max_length)
        row[name] = known[key]
        row[f"{name}_ratio"] = ratios(row["federated"], row[name])
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def ratios(fed: dict, central: dict) -> dict:
    accuracy = fed["accuracy"] / max(central["accuracy"], 1e-9)
    return {"accuracy": accuracy, "loss": fed["loss"] / central["loss"]}


def spread(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def summarize(rows: list[dict]) -> dict:
    """Per task and over everything: mean and min-max over seeds of each figure."""
    out: dict[str, Any] = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        figures = {"federated_accuracy": [r["federated"]["accuracy"] for r in mine],
                   "federated_loss": [r["federated"]["loss"] for r in mine]}
        for ref in ("central_compute", "central_steps"):
            if ref in mine[0]:
                figures[f"{ref}_accuracy"] = [r[ref]["accuracy"] for r in mine]
                figures[f"{ref}_loss"] = [r[ref]["loss"] for r in mine]
                figures[f"{ref}_accuracy_ratio"] = [r[f"{ref}_ratio"]["accuracy"] for r in mine]
                figures[f"{ref}_loss_ratio"] = [r[f"{ref}_ratio"]["loss"] for r in mine]
        out[task] = {name: spread(values) for name, values in figures.items()}
    return out


def measure(setup: Setup, known: dict | None = None, folder: Path | None = None) -> dict:
    """Every task × seed of `setup`, in `folder` (a temporary one by default) with its own $COMMONS_HOME
    (the model cache is kept); `known`: references already trained (`compare`)."""
    from modeling.load import cache_dir

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: one thread each is also the fastest here
    saved = {k: os.environ.get(k) for k in ("COMMONS_HOME", "COMMONS_CACHE")}
    os.environ["COMMONS_CACHE"] = str(cache_dir())
    try:
        with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
            work = folder or Path(tmp)
            os.environ["COMMONS_HOME"] = str(work / "home")
            rows = [compare(setup, task, seed, work, known) for task in setup.tasks for seed in setup.seeds]
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return {"setup": {**asdict(setup)}, "rows": rows, "tasks": summarize(rows)}


def run(setup: Setup | None = None) -> dict:
    result = measure(setup or Setup())
    tasks = result["tasks"]
    acc = [tasks[t]["central_compute_accuracy_ratio"] for t in tasks]
    loss = [tasks[t]["central_compute_loss_ratio"] for t in tasks]
    line = "; ".join(f"{t} accuracy ×{a['mean']:.2f} [{a['min']:.2f}-{a['max']:.2f}] loss ×{x['mean']:.2f} "
                     f"[{x['min']:.2f}-{x['max']:.2f}]" for t, a, x in zip(tasks, acc, loss))
    return {"name": "bench_quality", "ratio": round(float(np.mean([a["mean"] for a in acc])), 4),
            "loss_ratio": round(float(np.mean([x["mean"] for x in loss])), 4),
            "goal": "accuracy ratio ≥ 0.99 and loss ratio ≤ 1.1 on each task", **result,
            "summary": f"federated ÷ centralized at equal compute, mean [min-max] over seeds: {line}"}


TINY = Setup(model="tiny", tasks=("dates",), seeds=(0,), rounds=2, steps=3, batch_size=2, lr=0.02,
             max_length=64, per_node=12, eval_size=24)

# One factor at a time from the demo as it was (fedavg, 2 trainers per layer, fresh AdamW each round).
BEFORE = {"aggregation": "fedavg", "min_coverage": 2, "outer": {"optimizer": "none"}}
NESTEROV = {"optimizer": "nesterov", "lr": 0.7, "momentum": 0.9}
ABLATIONS: dict[str, Setup] = {
    "before": Setup(campaign=BEFORE, fresh_optimizer=True),
    "shards none": Setup(campaign={**BEFORE, "shards": "none"}, fresh_optimizer=True),
    "exact": Setup(campaign={**BEFORE, "aggregation": "exact"}, fresh_optimizer=True),
    "robust, coverage 3": Setup(campaign={**BEFORE, "aggregation": "robust", "min_coverage": 3},
                                fresh_optimizer=True),
    "AdamW kept": Setup(campaign=BEFORE),
    "IID": Setup(campaign=BEFORE, fresh_optimizer=True, iid=True),
    "4 rounds x 2 steps": Setup(campaign=BEFORE, fresh_optimizer=True, rounds=4, steps=2),
    "1 round x 8 steps": Setup(campaign=BEFORE, fresh_optimizer=True, rounds=1, steps=8),
    "nesterov": Setup(campaign={**BEFORE, "outer": NESTEROV}, fresh_optimizer=True),
    "adam": Setup(campaign={**BEFORE, "outer": {"optimizer": "adam"}}, fresh_optimizer=True),
    "kept + nesterov": Setup(campaign={**BEFORE, "outer": NESTEROV}),
    "kept + nesterov + coverage 3": Setup(campaign={**BEFORE, "outer": NESTEROV, "min_coverage": 3}),
    "kept + nesterov + robust, coverage 3": Setup(campaign={**BEFORE, "outer": NESTEROV, "min_coverage": 3,
                                                            "aggregation": "robust"}),
    "kept + robust, coverage 3": Setup(campaign={**BEFORE, "min_coverage": 3, "aggregation": "robust"}),
    "kept + nesterov 0.5 + robust, coverage 3": Setup(campaign={
        **BEFORE, "outer": {**NESTEROV, "lr": 0.5}, "min_coverage": 3, "aggregation": "robust"}),
    "kept + outer lr 0.7, no momentum + robust, coverage 3": Setup(campaign={
        **BEFORE, "outer": {"optimizer": "nesterov", "lr": 0.7, "momentum": 0.0}, "min_coverage": 3,
        "aggregation": "robust"}),
    "kept + robust, coverage 3, outer lr 1.5": Setup(campaign={
        **BEFORE, "outer": {"optimizer": "nesterov", "lr": 1.5, "momentum": 0.0}, "min_coverage": 3,
        "aggregation": "robust"}),
    "kept + robust, coverage 3, outer lr 2": Setup(campaign={
        **BEFORE, "outer": {"optimizer": "nesterov", "lr": 2.0, "momentum": 0.0}, "min_coverage": 3,
        "aggregation": "robust"}),
    "kept + robust, coverage 3, 4 rounds x 2 steps": Setup(
        campaign={**BEFORE, "min_coverage": 3, "aggregation": "robust"}, rounds=4, steps=2),
}


def ablate(names: list[str] | None = None, tasks: tuple[str, ...] = ("dates",),
           seeds: tuple[int, ...] = (0,)) -> list[dict]:
    """Each of ABLATIONS (or `names`) against the same references, one JSON line per ablation."""
    results, known = [], {}
    for name, setup in ABLATIONS.items():
        if names and name not in names:
            continue
        result = measure(replace(setup, tasks=tasks, seeds=seeds), known)
        results.append({"ablation": name, **result})
        print(json.dumps({"ablation": name, "tasks": result["tasks"]}), flush=True)
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["ablate"]:
        print(json.dumps(ablate(args[1:] or None), indent=1))
    else:
        print(json.dumps(run(TINY if args[:1] == ["tiny"] else None), indent=1))
