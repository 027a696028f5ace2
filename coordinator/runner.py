"""A campaign's rounds: send the global adapter, collect signed updates, aggregate, evaluate, publish.

The Flower `Grid` is the only transport; everything it carries is checked here before it is used.
State is checkpointed after every round, so a coordinator killed with -9 resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from coordinator import checkpoint
from coordinator.aggregate import Update, aggregate
from coordinator.campaign import Campaign
from coordinator.evaluate import exact_match
from coordinator.publish import sign_and_store, write_adapter
from protocol.errors import CommonsError
from protocol.keys import Identity, verify_signature
from protocol.lora import get_state, set_state, wrap
from protocol.manifest import AdapterMeta
from protocol.models import load_base
from protocol.records import read_records
from protocol.update import update_digest

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


def query_nodes(grid: Any, node_ids: list[int], timeout: float) -> dict[int, dict]:
    messages = [
        Message(RecordDict({"config": ConfigRecord({"want": "info"})}), dst_node_id=n, message_type="query")
        for n in node_ids
    ]
    infos = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if not reply.has_error():
            infos[reply.metadata.src_node_id] = dict(reply.content["info"])
    return infos


def train_config(campaign: Campaign, round_: int) -> dict:
    lora = {**campaign.lora.__dict__}
    return {
        "campaign": campaign.name,
        "round": round_,
        "base_model": campaign.base_model,
        "base_revision": campaign.base_revision,
        "lora": json.dumps(lora, sort_keys=True),
        "steps": campaign.train.steps,
        "batch_size": campaign.train.batch_size,
        "lr": campaign.train.lr,
        "max_length": campaign.train.max_length,
        "seed": campaign.lora.seed,
    }


def check_reply(
    reply: Message, campaign: Campaign, round_: int, infos: dict[int, dict]
) -> tuple[Update, dict] | str:
    """A verified update, or the one-line reason it was dropped."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        return f"node {node} failed: {reply.error.reason[:200]}"
    try:
        tensors = {k: v.numpy() for k, v in reply.content["adapter"].items()}
        metrics = dict(reply.content["metrics"])
        proof = dict(reply.content["proof"])
        public = bytes.fromhex(str(proof["public_key"]))
        signature = bytes.fromhex(str(proof["signature"]))
    except (KeyError, ValueError, TypeError) as exc:
        return f"node {node} sent a malformed reply ({type(exc).__name__})"
    known = infos.get(node, {}).get("public_key")
    if known and known != proof["public_key"]:
        return f"node {node} signed with a key other than the one it registered"
    if not verify_signature(public, update_digest(campaign.name, round_, tensors), signature):
        return f"node {node} sent an update whose signature does not verify"
    update = Update(node_id=public.hex(), tensors=tensors, num_examples=int(metrics.get("num_examples", 0)))
    return update, metrics


def run(grid: Any, campaign: Campaign, home: Path) -> dict:
    folder = home / "campaigns" / campaign.name
    events = Events(folder / "events.jsonl")
    identity = Identity.load_or_create(home / "identity" / "ed25519.key")
    test = read_records(campaign.eval_file)[: campaign.eval_size]
    events("campaign_start", name=campaign.name, base_model=campaign.base_model, rounds=campaign.rounds)

    base, tokenizer = load_base(campaign.base_model, campaign.base_revision)
    lora_spec = {**campaign.lora.__dict__}
    print_id = fingerprint(campaign)
    resumed = checkpoint.load(folder / "checkpoint", print_id)
    if resumed:
        tensors, state = resumed
        model = wrap(base, lora_spec)
        set_state(model, tensors)
        events("resumed", round=state["round"])
    else:
        base_eval = exact_match(base, tokenizer, test)
        events("base_eval", accuracy=base_eval["accuracy"], n=base_eval["n"])
        model = wrap(base, lora_spec)
        tensors = get_state(model)
        state = {
            "round": 0,
            "fingerprint": print_id,
            "accuracy_base": base_eval["accuracy"],
            "curve": [],
            "ledger": {},
        }

    for round_ in range(state["round"] + 1, campaign.rounds + 1):
        nodes = wait_for_nodes(grid, campaign.min_nodes, campaign.node_wait, events)
        infos = query_nodes(grid, nodes, timeout=min(campaign.round_timeout, 120))
        config = ConfigRecord(train_config(campaign, round_))
        payload = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})
        messages = [
            Message(
                RecordDict({"adapter": payload, "config": config}),
                dst_node_id=n,
                message_type="train",
                group_id=str(round_),
            )
            for n in infos
        ]
        events("round_start", round=round_, nodes=len(messages))
        updates, metrics, dropped = [], {}, []
        for reply in grid.send_and_receive(messages, timeout=campaign.round_timeout):
            checked = check_reply(reply, campaign, round_, infos)
            if isinstance(checked, str):
                dropped.append(checked)
                events("update_dropped", round=round_, reason=checked)
                continue
            update, node_metrics = checked
            updates.append(update)
            metrics[update.node_id] = node_metrics
            events(
                "update",
                round=round_,
                node=update.node_id[:16],
                loss=node_metrics.get("loss"),
                tokens=node_metrics.get("tokens"),
            )
        if len(updates) < campaign.min_nodes:
            raise CommonsError(
                f"round {round_} got {len(updates)} valid updates, fewer than min_nodes={campaign.min_nodes}: "
                f"{'; '.join(dropped) or 'nodes timed out'}"
            )
        tensors, report = aggregate(tensors, updates, campaign.aggregation)
        set_state(model, tensors)
        evaluation = exact_match(model, tokenizer, test)
        accepted = set(report.accepted)
        losses = [metrics[n]["loss"] for n in accepted if n in metrics]
        for node_id in accepted:
            entry = state["ledger"].setdefault(
                node_id, {"node": node_id, "rounds": 0, "tokens": 0, "examples": 0}
            )
            entry["rounds"] += 1
            entry["tokens"] += int(metrics[node_id].get("tokens", 0))
            entry["examples"] += int(metrics[node_id].get("num_examples", 0))
        point = {
            "round": round_,
            "loss": float(np.mean(losses)) if losses else None,
            "accuracy": evaluation["accuracy"],
            "accepted": len(accepted),
            "rejected": len(report.rejected),
        }
        state["curve"].append(point)
        state["round"] = round_
        state["samples"] = evaluation["samples"]
        checkpoint.save(folder / "checkpoint", tensors, state)
        events("round_end", **point, rejected_nodes=report.rejected)

    return finish(campaign, home, model, state, identity, events)


def finish(
    campaign: Campaign, home: Path, model: Any, state: dict, identity: Identity, events: Events
) -> dict:
    folder = home / "campaigns" / campaign.name
    final = state["curve"][-1]["accuracy"] if state["curve"] else state["accuracy_base"]
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
