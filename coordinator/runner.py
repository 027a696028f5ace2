"""A campaign's rounds: plan shards, collect signed updates, aggregate per shard, evaluate, publish.

The Flower `Grid` is the only transport (coordinator/rounds.py talks to it and checks every reply).
State (global adapter, the exact rule's residual, curve, ledger) is checkpointed after every round, so a
coordinator killed with -9 resumes after the last completed round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator import checkpoint
from coordinator.aggregate import AggregateConfig
from coordinator.campaign import Campaign
from coordinator.evaluate import exact_match
from coordinator.plan import (
    aggregate_sharded,
)
from coordinator.privacy import DPConfig
from coordinator.publish import sign_and_store, write_adapter
from coordinator.residual import accumulate, apply, join_checkpoint, project, snapshot, split_checkpoint
from coordinator.rounds import Roster, capabilities, run_round
from protocol.errors import CommonsError
from protocol.keys import Identity
from protocol.lora import get_state, set_state, wrap
from protocol.manifest import AdapterMeta
from protocol.models import load_base
from protocol.records import read_records

log = logging.getLogger("commons.coordinator")


class Events:
    """One JSON line per event: the demo's progress bars and `commons coordinator status` read it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}, default=str)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        log.info("%s %s", event, json.dumps(fields, default=str)[:300])


def fingerprint(campaign: Campaign) -> str:
    data = campaign.to_json()
    data.pop("source", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def wait_for_nodes(grid: Any, want: int, timeout: float, events: Events) -> list[int]:
    deadline = time.monotonic() + timeout
    announced = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want:
            return nodes
        if len(nodes) != announced:
            events("waiting_for_nodes", have=len(nodes), want=want)
            announced = len(nodes)
        if time.monotonic() > deadline:
            raise CommonsError(
                f"only {len(nodes)} of {want} volunteers connected within {timeout:.0f}s: start more nodes "
                "or lower min_nodes in the campaign file"
            )
        time.sleep(1.0)


def aggregate_config(campaign: Campaign) -> tuple[str, AggregateConfig]:
    dp = None
    if campaign.dp:
        dp = DPConfig(clip=campaign.dp.clip, noise_multiplier=campaign.dp.noise_multiplier,
                      delta=campaign.dp.delta, rounds=campaign.rounds)
    return campaign.aggregation, AggregateConfig(dp=dp)


def run(grid: Any, campaign: Campaign, home: Path) -> dict:
    folder = home / "campaigns" / campaign.name
    events = Events(folder / "events.jsonl")
    identity = Identity.load_or_create(home / "identity" / "ed25519.key")
    test = read_records(campaign.eval_file)[: campaign.eval_size]
    events("campaign_start", name=campaign.name, base_model=campaign.base_model, rounds=campaign.rounds,
           aggregation=campaign.aggregation, shards=campaign.shards, upload_dtype=campaign.upload_dtype)

    base, tokenizer = load_base(campaign.base_model, campaign.base_revision)
    lora_spec = {**campaign.lora.__dict__}
    scaling = campaign.lora.alpha / campaign.lora.r
    print_id = fingerprint(campaign)
    resumed = checkpoint.load(folder / "checkpoint", print_id)
    if resumed:
        saved, state = resumed
        tensors, total = split_checkpoint(saved)
        events("resumed", round=state["round"])
    else:
        base_eval = exact_match(base, tokenizer, test)
        events("base_eval", accuracy=base_eval["accuracy"], n=base_eval["n"])
        total = {}
        state = {"round": 0, "fingerprint": print_id, "accuracy_base": base_eval["accuracy"], "curve": [],
                 "ledger": {}}
    model = wrap(base, lora_spec)
    if resumed:
        set_state(model, tensors)
    else:
        tensors = get_state(model)
    originals = snapshot(model, total)
    apply(model, originals, total, scaling)
    rule, config = aggregate_config(campaign)

    roster = Roster()  # node infos by Flower id across rounds: only ids not seen before are queried
    for round_ in range(state["round"] + 1, campaign.rounds + 1):
        flower_ids = wait_for_nodes(grid, campaign.min_nodes, campaign.node_wait, events)
        nodes = capabilities(roster.refresh(grid, flower_ids, timeout=min(campaign.round_timeout, 60)), events)
        if len(nodes) < campaign.min_nodes:
            raise CommonsError(f"round {round_}: only {len(nodes)} of the connected nodes answered the query, "
                               f"fewer than min_nodes={campaign.min_nodes}: check the nodes' logs")
        events("round_start", round=round_, nodes=len(nodes))
        got, plan = run_round(grid, campaign, round_, tensors, nodes, events, roster)
        if len(got) < campaign.min_nodes:
            raise CommonsError(
                f"round {round_} got {len(got)} valid updates, fewer than min_nodes={campaign.min_nodes}: "
                "start more nodes, raise round_timeout or lower min_nodes in the campaign file"
            )
        metrics = {key: m for key, (_, m) in got.items()}
        tensors, report = aggregate_sharded(tensors, [u for u, _ in got.values()], plan, rule, config)
        if report.residuals:
            total = accumulate(total, report.residuals)
            originals = snapshot(model, total, originals)
        set_state(model, tensors)
        apply(model, originals, total, scaling)
        evaluation = exact_match(model, tokenizer, test)
        accepted = set(report.accepted)
        for node_id in accepted:
            entry = state["ledger"].setdefault(node_id, {"node": node_id, "rounds": 0, "tokens": 0, "examples": 0})
            entry["rounds"] += 1
            entry["tokens"] += int(metrics[node_id].get("tokens", 0))
            entry["examples"] += int(metrics[node_id].get("num_examples", 0))
        losses = [float(metrics[n]["loss"]) for n in accepted if n in metrics]
        point = {
            "round": round_,
            "loss": float(np.mean(losses)) if losses else None,
            "accuracy": evaluation["accuracy"],
            "accepted": len(accepted),
            "rejected": len(report.rejected),
            "upload_bytes": int(np.mean([int(m.get("upload_bytes", 0)) for m in metrics.values()])),
        }
        if report.dp:
            state["dp"] = report.dp
        state["curve"].append(point)
        state["round"] = round_
        state["samples"] = evaluation["samples"]
        checkpoint.save(folder / "checkpoint", join_checkpoint(tensors, total), state)
        events("round_end", **point, rejected_nodes=report.rejected, clipped=report.clipped,
               coverage=plan.coverage(), dp=report.dp)

    if total:  # publish what PEFT can load: the residual re-projected into the adapter's rank
        apply(model, originals, {}, scaling)
        set_state(model, project(tensors, total))
        published = exact_match(model, tokenizer, test)
        state["accuracy_exact"] = state["curve"][-1]["accuracy"] if state["curve"] else None
        state["accuracy_published"] = published["accuracy"]
        events("projected", accuracy_exact=state["accuracy_exact"], accuracy_published=published["accuracy"])
    return finish(campaign, home, model, state, identity, events)


def finish(
    campaign: Campaign, home: Path, model: Any, state: dict, identity: Identity, events: Events
) -> dict:
    folder = home / "campaigns" / campaign.name
    final = state["curve"][-1]["accuracy"] if state["curve"] else state["accuracy_base"]
    final = state.get("accuracy_published", final)  # the exact rule: score what is published
    result = {
        "name": campaign.name,
        "rounds": state["round"],
        "accuracy_base": state["accuracy_base"],
        "accuracy_adapter": final,
        "curve": state["curve"],
        "samples": state.get("samples", []),
        "contributors": sorted(state["ledger"]),
        "ledger": list(state["ledger"].values()),
        "coordinator": identity.public_hex,
        "dp": state.get("dp"),
        "published": False,
    }
    if final < state["accuracy_base"] + campaign.publish_margin:
        result["reason"] = (
            f"adapter scored {final:.1%}, not above base {state['accuracy_base']:.1%} + margin "
            f"{campaign.publish_margin:.1%}: not published"
        )
        events("not_published", reason=result["reason"])
    else:
        published = _published_versions(home)
        previous = published.get(campaign.name)
        adapter_dir = write_adapter(model, folder / "adapter", campaign, result, len(result["contributors"]))
        meta = AdapterMeta(
            name=campaign.name,
            version=(previous["version"] + 1) if previous else 1,
            base_model=campaign.base_model,
            base_revision=campaign.base_revision,
            lora_config={**campaign.lora.__dict__},
            campaign=campaign.name,
            rounds=state["round"],
            contributors=result["contributors"],
            datasets=campaign.datasets,
            eval={
                "metric": "exact_match",
                "accuracy_base": state["accuracy_base"],
                "accuracy_adapter": final,
                "n": campaign.eval_size,
                "curve": state["curve"],
                "task": campaign.task,
                "aggregation": campaign.aggregation,
                **({"accuracy_exact": state["accuracy_exact"]} if "accuracy_exact" in state else {}),
                **({"dp": state["dp"]} if state.get("dp") else {}),
            },
            license=campaign.license,
            previous=previous["cid"] if previous else None,
            ledger=result["ledger"],
        )
        cid, _ = sign_and_store(adapter_dir, meta, identity)
        published[campaign.name] = {"version": meta.version, "cid": cid}
        (home / "published.json").write_text(json.dumps(published, indent=1))
        result.update(published=True, adapter_cid=cid, version=meta.version, adapter_dir=str(adapter_dir))
        events("published", cid=cid, version=meta.version)
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    events("campaign_end", published=result["published"])
    return result


def _published_versions(home: Path) -> dict:
    try:
        return json.loads((home / "published.json").read_text())
    except (OSError, ValueError):
        return {}
