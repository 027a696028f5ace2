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
from coordinator.aggregate import AggregateConfig, Update
from coordinator.campaign import Campaign
from coordinator.evaluate import exact_match
from coordinator.plan import (
    Plan,
    aggregate_sharded,
    capability_score,
    layers_from_keys,
    make_plan,
    reassign,
    shard_keys,
)
from coordinator.privacy import DPConfig
from coordinator.publish import sign_and_store, write_adapter
from coordinator.residual import accumulate, apply, join_checkpoint, project, snapshot, split_checkpoint
from protocol.errors import CommonsError, VerifyError
from protocol.keys import Identity, verify_signature
from protocol.lora import get_state, set_state, wrap
from protocol.manifest import AdapterMeta
from protocol.models import load_base
from protocol.records import read_records
from protocol.update import decode, update_digest

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


def capabilities(infos: dict[int, dict], events: Events) -> dict[str, tuple[int, dict]]:
    """public key -> (Flower node id, capability); one entry per key, however many nodes claim it."""
    nodes: dict[str, tuple[int, dict]] = {}
    for flower_id, info in sorted(infos.items()):
        key = str(info.get("public_key", ""))
        try:
            caps = json.loads(str(info.get("capability") or "{}"))
            capability_score(caps)
        except (ValueError, CommonsError) as exc:
            events("node_ignored", node=key[:16], reason=f"bad capability report: {str(exc)[:200]}")
            continue
        if key in nodes:
            events("node_ignored", node=key[:16], reason="a second node with the same key joined")
            continue
        nodes[key] = (flower_id, caps)
    return nodes


def plan_round(campaign: Campaign, keys: list[str], nodes: dict[str, tuple[int, dict]]) -> Plan:
    """Spans sized to hardware ("auto"), or every node training the whole adapter ("none")."""
    caps = {key: c for key, (_, c) in nodes.items()}
    coverage = campaign.min_coverage if campaign.shards == "auto" else len(caps)
    return make_plan(layers_from_keys(keys), caps, min_coverage=max(1, coverage))


def train_config(campaign: Campaign, round_: int, keys: list[str]) -> dict:
    lora = {**campaign.lora.__dict__}
    return {
        "campaign": campaign.name,
        "round": round_,
        "base_model": campaign.base_model,
        "base_revision": campaign.base_revision,
        "lora": json.dumps(lora, sort_keys=True),
        "keys": json.dumps(keys),
        "upload_dtype": campaign.upload_dtype,
        "steps": campaign.train.steps,
        "batch_size": campaign.train.batch_size,
        "lr": campaign.train.lr,
        "max_length": campaign.train.max_length,
        "seed": campaign.lora.seed,
    }


def check_reply(
    reply: Message, campaign: Campaign, round_: int, known_key: str, sent: dict[str, np.ndarray]
) -> tuple[Update, dict] | str:
    """A verified, decoded update for exactly the keys in `sent`, or the one-line reason it was dropped."""
    node = known_key[:16] or str(reply.metadata.src_node_id)
    if reply.has_error():
        return f"node {node} failed: {reply.error.reason[:200]}"
    try:
        wire = {k: v.numpy() for k, v in reply.content["adapter"].items()}
        metrics = dict(reply.content["metrics"])
        proof = dict(reply.content["proof"])
        public = bytes.fromhex(str(proof["public_key"]))
        signature = bytes.fromhex(str(proof["signature"]))
    except (KeyError, ValueError, TypeError) as exc:
        return f"node {node} sent a malformed reply ({type(exc).__name__})"
    if known_key != proof["public_key"]:
        return f"node {node} signed with a key other than the one it registered"
    if not verify_signature(public, update_digest(campaign.name, round_, wire), signature):
        return f"node {node} sent an update whose signature does not verify"
    try:
        tensors = decode(wire, sent, campaign.upload_dtype)
    except VerifyError as exc:
        return f"node {node}: {exc}"
    if set(tensors) != set(sent):
        return f"node {node} sent {len(tensors)} tensors, not the {len(sent)} of its shard"
    try:
        examples = int(metrics.get("num_examples", 0))
    except (TypeError, ValueError):
        return f"node {node} sent a malformed reply (num_examples)"
    return Update(node_id=public.hex(), tensors=tensors, num_examples=examples), metrics


def train_nodes(
    grid: Any,
    campaign: Campaign,
    round_: int,
    tensors: dict[str, np.ndarray],
    work: dict[str, list[str]],
    nodes: dict[str, tuple[int, dict]],
    events: Events,
    group: str,
) -> dict[str, tuple[Update, dict]]:
    """Send each node the global adapter and the keys it trains; the verified replies, by public key.
    The whole adapter goes down (a node's forward pass needs the current frozen layers too); only the
    node's shard comes back up."""
    payload = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})
    messages, owner = [], {}
    for key, shard in work.items():
        flower_id = nodes[key][0]
        config = ConfigRecord(train_config(campaign, round_, shard))
        messages.append(
            Message(RecordDict({"adapter": payload, "config": config}), dst_node_id=flower_id,
                    message_type="train", group_id=group)
        )
        owner[flower_id] = key
    got: dict[str, tuple[Update, dict]] = {}
    for reply in grid.send_and_receive(messages, timeout=campaign.round_timeout):
        key = owner.get(reply.metadata.src_node_id)
        if key is None or key in got:
            continue
        checked = check_reply(reply, campaign, round_, key, {k: tensors[k] for k in work[key]})
        if isinstance(checked, str):
            events("update_dropped", round=round_, node=key[:16], reason=checked)
            continue
        got[key] = checked
        metrics = checked[1]
        events("update", round=round_, group=group, node=key[:16], keys=len(work[key]),
               loss=metrics.get("loss"), tokens=metrics.get("tokens"), upload_bytes=metrics.get("upload_bytes"))
    for key in work:
        if key not in got:
            events("node_missing", round=round_, group=group, node=key[:16])
    return got


def merge(main: tuple[Update, dict], extra: tuple[Update, dict]) -> tuple[Update, dict]:
    """A node's main shard plus the span it took over in a catch-up sub-round: one update."""
    (u, m), (x, n) = main, extra
    metrics = {**m, "tokens": int(m.get("tokens", 0)) + int(n.get("tokens", 0)),
               "upload_bytes": int(m.get("upload_bytes", 0)) + int(n.get("upload_bytes", 0))}
    return Update(u.node_id, {**u.tensors, **x.tensors}, u.num_examples), metrics


def run_round(
    grid: Any, campaign: Campaign, round_: int, tensors: dict[str, np.ndarray],
    nodes: dict[str, tuple[int, dict]], events: Events,
) -> tuple[dict[str, tuple[Update, dict]], Plan]:
    """Train every shard; when nodes drop, their spans go to lane neighbours in catch-up sub-rounds until
    every layer is covered by the nodes that answered (or no one is left)."""
    keys = sorted(tensors)
    plan = plan_round(campaign, keys, nodes)
    events("plan", round=round_, coverage=plan.coverage(), shards=[
        {"node": s.node_id[:16], "lane": s.lane, "start": s.start, "end": s.end,
         "keys": len(shard_keys(plan, s.node_id, keys))} for s in plan.shards])
    got = train_nodes(grid, campaign, round_, tensors, {s.node_id: shard_keys(plan, s.node_id, keys)
                                                       for s in plan.shards}, nodes, events, str(round_))
    sub = 0
    while missing := [s.node_id for s in plan.shards if s.node_id not in got]:
        new = reassign(plan, missing)
        extra = {s.node_id: sorted(set(shard_keys(new, s.node_id, keys)) - set(shard_keys(plan, s.node_id, keys)))
                 for s in new.shards}
        extra = {k: v for k, v in extra.items() if v}
        events("reassigned", round=round_, dropped=[m[:16] for m in missing],
               to={k[:16]: len(v) for k, v in extra.items()}, coverage=new.coverage())
        plan = new
        if not extra:
            break
        sub += 1
        more = train_nodes(grid, campaign, round_, tensors, extra, nodes, events, f"{round_}.{sub}")
        for key in extra:
            if key in more:
                got[key] = merge(got[key], more[key])
            else:  # it took the work and failed it: its own span is lost too, so reassign again
                got.pop(key, None)
    return got, plan


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

    for round_ in range(state["round"] + 1, campaign.rounds + 1):
        flower_ids = wait_for_nodes(grid, campaign.min_nodes, campaign.node_wait, events)
        nodes = capabilities(query_nodes(grid, flower_ids, timeout=min(campaign.round_timeout, 60)), events)
        if len(nodes) < campaign.min_nodes:
            raise CommonsError(f"round {round_}: only {len(nodes)} of the connected nodes answered the query, "
                               f"fewer than min_nodes={campaign.min_nodes}: check the nodes' logs")
        events("round_start", round=round_, nodes=len(nodes))
        got, plan = run_round(grid, campaign, round_, tensors, nodes, events)
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
