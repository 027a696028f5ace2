"""One round on the Flower Grid: ask the nodes what they can do, plan shards, send each node its keys,
verify and decode the signed replies, and re-send dropped nodes' spans to their lane neighbours.

Nodes are known by their ed25519 public key (hex) here and in the plan; Flower node ids only address
messages. Every reply is checked (signature over the bytes sent, the shard's exact keys, the campaign's
upload encoding) before anything else reads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from coordinator.aggregate import Update
from coordinator.campaign import Campaign
from coordinator.plan import Plan, capability_score, layers_from_keys, make_plan, reassign, shard_keys
from protocol.errors import CommonsError, VerifyError
from protocol.keys import verify_signature
from protocol.update import decode, update_digest

Events = Callable[..., None]
Nodes = dict[str, tuple[int, dict]]  # public key hex -> (Flower node id, capability)


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


def train_config(campaign: Campaign, round_: int, keys: list[str], slot: tuple[int, int] = (0, 1)) -> dict:
    """What one node is told to do; `slot` = (this node's index, nodes this round), for data slices."""
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
    order = sorted(nodes)
    for key, shard in work.items():
        flower_id = nodes[key][0]
        config = ConfigRecord(train_config(campaign, round_, shard, (order.index(key), len(order))))
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
