"""One round on the Flower Grid: plan shards over the nodes the roster knows, send each node its keys,
verify and decode the signed replies, and re-send dropped nodes' spans to their lane neighbours.

Nodes are known by their ed25519 public key (hex) here and in the plan; Flower node ids only address
messages. Every reply is checked (signature over the bytes sent, the shard's exact keys, the campaign's
upload encoding) before anything else reads it; who is there and what they said is coordinator/roster.py.

A round closes on time (`Closing`): once a quorum of its volunteers answered and the rest had as long
again, or at `round_timeout`, whichever comes first; nothing waits on a dead node's heartbeat. Spans that
coverage still needs then get one catch-up, within round_timeout more:

    plan ── send ── quorum answered ── as long again ── late ones dropped ── catch-up where coverage is short
    t0            t0 + q                t0 + 2q (at most t0 + round_timeout)   (at most round_timeout more)
"""

from __future__ import annotations

import math
import time
from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode

from coordinator.campaign import Campaign
from coordinator.plan import (
    Plan,
    layers_from_keys,
    make_plan,
    memory_floors,
    reassign,
    shard_keys,
    without,
)
from coordinator.roster import (
    POLL_SECONDS,
    QUERY_SECONDS,
    Roster,
    capabilities,
    error_text,
    exchange,
    query_nodes,
    upload_seconds,
)
from coordinator.rules import Update
from protocol.errors import VerifyError
from protocol.instruction import TrainInstruction
from protocol.packed import pack, unpack
from protocol.signing.keys import verify_signature
from protocol.update import Decoded, update_digest

Events = Callable[..., None]
Nodes = dict[str, tuple[int, dict]]  # public key hex -> (Flower node id, capability)
__all__ = ["Nodes", "Roster", "capabilities", "check_reply", "coverage_shortfall", "exchange", "query_nodes",
           "run_round", "tell_the_end", "train_instruction"]  # the roster's names, as callers knew them here


def tell_the_end(grid: Any, campaign: str, outcome: str, timeout: float = 15.0) -> int:
    """Tell every connected volunteer the campaign is over and how it ended ("published NAME vN …"), so its
    status line says so instead of waiting for a next round; returns how many answered. Best effort: a
    volunteer that misses it still shows its last round."""
    config = ConfigRecord({"campaign": campaign, "outcome": outcome})
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type="query.ended")
                for n in grid.get_node_ids()]
    return sum(not reply.has_error() for _, reply in exchange(grid, messages, timeout))


MAX_REJOINS = 3  # re-sends per round to nodes that came back: each needs a restart, each may cost a timeout
GRACE = 1.0  # once a quorum answered, the others get this many times as long as the quorum took
MIN_GRACE = 5.0  # and at least this many seconds (a busy machine's jitter is not lateness)
WIRE_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}  # bytes per parameter a node uploads


@dataclass
class Closing:
    """When an exchange stops waiting: at `until` (the round's deadline, time.monotonic()), or, with a
    `quorum`, once that many volunteers sent a verified update and the others had GRACE times as long
    again as that took. Those still silent are late: an update that comes after is never read (it is a
    delta from this round's global, judged against others it was not trained with), and their spans go
    to lane neighbours where coverage needs them."""

    until: float
    quorum: int | None = None  # None: wait for everyone until `until` (catch-up sub-rounds, re-sends)
    start: float = field(default_factory=lambda: time.monotonic())  # looked up when made: tests fake it
    reached: float | None = None  # when the quorum answered

    def over(self, answered: int) -> bool:
        now = time.monotonic()
        if self.quorum is not None and self.reached is None and answered >= self.quorum:
            self.reached = now
        if self.reached is None:
            return False
        return now - self.reached >= max(MIN_GRACE, GRACE * (self.reached - self.start))


def quorum(campaign: Campaign, planned: int) -> int:
    """How many of a round's `planned` volunteers must answer before the others count as late."""
    return min(planned, max(campaign.min_nodes, math.ceil(campaign.quorum * planned)))


def plan_round(campaign: Campaign, keys: list[str], nodes: dict[str, tuple[int, dict]],
               pace: dict[str, float] | None = None) -> Plan:
    """Spans sized to hardware ("auto"), or every node training the whole adapter ("none"); `pace`
    shrinks the spans of volunteers that missed their last deadlines (Roster.pace)."""
    caps = {key: c for key, (_, c) in nodes.items()}
    coverage = campaign.min_coverage if campaign.shards == "auto" else len(caps)
    floors = memory_floors(campaign, caps)  # how low each node's memory lets its span start
    return make_plan(layers_from_keys(keys), caps, min_coverage=max(1, coverage), floors=floors, pace=pace)


def train_instruction(campaign: Campaign, round_: int, keys: list[str],
                      slot: tuple[int, int] = (0, 1)) -> TrainInstruction:
    """What one node is told to do; `slot` = (this node's index, nodes this round), for data slices."""
    instruction = TrainInstruction(
        campaign=campaign.name, round=round_, base_model=campaign.base_model,
        base_revision=campaign.base_revision, lora={**campaign.lora.__dict__}, keys=tuple(keys),
        upload_dtype=campaign.upload_dtype, quantization=campaign.quantization, steps=campaign.train.steps,
        batch_size=campaign.train.batch_size, lr=campaign.train.lr, max_length=campaign.train.max_length,
        seed=campaign.lora.seed, data=campaign.data,
    )
    if campaign.data == "campaign":  # node/data.py fetches these CIDs and trains on slice `data_slot`
        instruction = replace(instruction, datasets=tuple(str(d["cid"]) for d in campaign.datasets),
                              data_source=campaign.data_source, data_slot=slot[0], data_slots=slot[1])
    return instruction


def check_reply(
    reply: Message, campaign: Campaign, round_: int, known_key: str, sent: dict[str, np.ndarray]
) -> tuple[Update, dict] | str:
    """A verified, decoded update for exactly the keys in `sent`, or the one-line reason it was dropped."""
    node = known_key[:16] or str(reply.metadata.src_node_id)
    if reply.has_error():
        return f"node {node} failed: {error_text(reply.error.reason)}"
    try:
        wire = unpack({k: v.numpy() for k, v in reply.content["adapter"].items()})
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
        tensors = Decoded(wire, sent, campaign.upload_dtype)  # held in its wire form until aggregated
    except VerifyError as exc:
        return f"node {node}: {exc}"
    if set(tensors) != set(sent):
        return f"node {node} sent {len(tensors)} tensors, not the {len(sent)} of its shard"
    try:
        examples = int(metrics.get("num_examples", 0))
    except (TypeError, ValueError):
        return f"node {node} sent a malformed reply (num_examples)"
    return Update(node_id=public.hex(), tensors=tensors, num_examples=examples), metrics


def adopt(nodes: Nodes, back: Nodes, round_: int, events: Events, roster: Roster | None) -> None:
    """Nodes that reconnected under a new Flower id: address them there from now on, and forget the old
    id (still listed until its heartbeat lapses), so that it is never taken for the node again."""
    for key, node in back.items():
        if roster is not None and key in nodes:
            roster.suspect(nodes[key][0])
        nodes[key] = node
        events("rejoined", round=round_, node=key[:16], node_id=node[0])


def train_nodes(
    grid: Any,
    campaign: Campaign,
    round_: int,
    tensors: dict[str, np.ndarray],
    work: dict[str, list[str]],
    nodes: dict[str, tuple[int, dict]],
    events: Events,
    group: str,
    roster: Roster | None = None,
    closing: Closing | None = None,
) -> dict[str, tuple[Update, dict]]:
    """Send each node the global adapter and the keys it trains; the verified replies, by public key.
    The whole adapter goes down (a node's forward pass needs the current frozen layers too); only the
    node's shard comes back up. With a `roster`, a node seen reconnecting under a new id (same key) is
    sent its shard again at once and not waited for on its old id; `nodes` is updated to the new id.
    `closing` says when to stop waiting (default: everyone, for round_timeout)."""
    closing = closing or Closing(time.monotonic() + campaign.round_timeout)
    payload = ArrayRecord({k: Array(v) for k, v in pack(tensors).items()})  # two arrays, not hundreds
    owner: dict[int, str] = {}
    groups: dict[str, str] = {}
    slots = {key: i for i, key in enumerate(sorted(nodes))}

    def message(key: str, flower_id: int, grp: str) -> Message:
        owner[flower_id], groups[key] = key, grp
        instruction = train_instruction(campaign, round_, work[key], (slots[key], len(slots)))
        config = ConfigRecord(instruction.to_config())
        return Message(RecordDict({"adapter": payload, "config": config}), dst_node_id=flower_id,
                       message_type="train", group_id=grp)

    messages = [message(key, nodes[key][0], group) for key in work]
    got: dict[str, tuple[Update, dict]] = {}
    why: dict[str, str] = {}
    rejoins = dict.fromkeys(work, 0)

    def more(pending: set[int]) -> tuple[set[int], list[Message]]:
        """Between polls: stop waiting on the old id of a node that reconnected and send it its own shard
        again, at once (the same work: it resumes from its own checkpoint); ask volunteers that joined
        meanwhile what they are (the next round plans them); close the exchange when `closing` says so."""
        waiting = {owner[d]: d for d in pending if d in owner and rejoins[owner[d]] < MAX_REJOINS}
        back = {}
        if roster is not None:
            back = roster.rejoined(grid, waiting, min(QUERY_SECONDS, campaign.round_timeout))
        if closing.over(len(got)):
            for d in pending:
                why.setdefault(owner.get(d, ""), late_reason(closing, len(got), len(work)))
            return pending, []
        adopt(nodes, back, round_, events, roster)
        extra = []
        for key, node in back.items():
            rejoins[key] += 1
            extra.append(message(key, node[0], f"{group}.rejoin{rejoins[key]}"))
        return {waiting[key] for key in back}, extra

    largest = max((sum(tensors[k].size for k in keys) for keys in work.values()), default=0)
    upload = upload_seconds(largest * WIRE_BYTES.get(campaign.upload_dtype, 4))
    for flower_id, reply in exchange(grid, messages, campaign.round_timeout, more, closing.until, upload):
        key = owner.get(flower_id)
        if key is None or key in got:
            continue
        if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
            why[key] = "it left the network: stopped, or its heartbeat lapsed"  # missing, not a bad update
            continue
        if reply.has_error() and reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE:
            why[key] = "it left while sending its update: the upload never completed"
            continue
        checked = check_reply(reply, campaign, round_, key, {k: tensors[k] for k in work[key]})
        if isinstance(checked, str):
            events("update_dropped", round=round_, node=key[:16], reason=checked)
            why[key] = "its update was dropped"
            continue
        got[key] = checked
        metrics = checked[1]
        events("update", round=round_, group=groups[key], node=key[:16], keys=len(work[key]),
               loss=metrics.get("loss"), tokens=metrics.get("tokens"),
               upload_bytes=metrics.get("upload_bytes"),
               resumed_from=metrics.get("resumed_from", 0), seconds=metrics.get("seconds"),
               load_seconds=metrics.get("load_seconds"), task_seconds=metrics.get("task_seconds"))
    for key in work:
        if key in got and roster is not None:
            roster.kept(key)
        if key not in got:
            if roster is not None:
                roster.missed(key)  # its next span is smaller (Roster.pace)
                roster.suspect(nodes[key][0])
            events("node_missing", round=round_, group=groups[key], node=key[:16],
                   reason=why.get(key, "no reply by the round's deadline"))
    return got


def late_reason(closing: Closing, answered: int, planned: int) -> str:
    """Why the round closed without a node that may still be working."""
    if closing.reached is None:
        return "no reply by the round's deadline"
    took = closing.reached - closing.start
    return (f"late: {answered} of {planned} answered (quorum {closing.quorum} in {took:.0f}s) and it had "
            f"{max(MIN_GRACE, GRACE * took):.0f}s more; its update will not be used")


def merge(main: tuple[Update, dict], extra: tuple[Update, dict]) -> tuple[Update, dict]:
    """A node's main shard plus the span it took over in a catch-up sub-round: one update."""
    (u, m), (x, n) = main, extra
    metrics = {**m, "tokens": int(m.get("tokens", 0)) + int(n.get("tokens", 0)),
               "upload_bytes": int(m.get("upload_bytes", 0)) + int(n.get("upload_bytes", 0))}
    return Update(u.node_id, ChainMap(x.tensors, u.tensors), u.num_examples), metrics  # still undecoded


def coverage_shortfall(campaign: Campaign, have: int) -> str:
    """Why fewer trainers per layer than min_coverage matter, in one line ("" when there are enough)."""
    if have >= campaign.min_coverage:
        return ""
    return (f"min_coverage = {campaign.min_coverage} but only {have} volunteer{'s' * (have != 1)} train each "
            "layer this round: too few to out-vote a bad one (start more volunteers, or lower min_coverage "
            "to accept it)")


def await_rejoin(grid: Any, roster: Roster, missing: dict[str, int], campaign: Campaign, round_: int,
                 events: Events, until: float) -> Nodes:
    """Missing nodes seen back under a new Flower id, polled for until `until` (time.monotonic())."""
    said = False
    while True:
        back = roster.rejoined(grid, missing, min(QUERY_SECONDS, campaign.round_timeout))
        if back or time.monotonic() >= until:
            return back
        if not said:
            events("waiting_for_rejoin", round=round_, nodes=[k[:16] for k in missing],
                   seconds=round(until - time.monotonic()))
            said = True
        time.sleep(min(POLL_SECONDS, max(0.0, until - time.monotonic())))


def run_round(
    grid: Any, campaign: Campaign, round_: int, tensors: dict[str, np.ndarray],
    nodes: dict[str, tuple[int, dict]], events: Events, roster: Roster | None = None,
) -> tuple[dict[str, tuple[Update, dict]], Plan]:
    """Train every shard: the round closes at the latest round_timeout after it started (`Closing`). A
    node that dropped and reconnected (same key, new Flower id; `roster` finds it) before that is re-sent
    its own shard: the same work, so it resumes from its own checkpoint. The spans of nodes still missing
    go to lane neighbours in catch-up sub-rounds, where the nodes that answered give a layer fewer than
    min_coverage trainers, within round_timeout more at most. The plan returned holds only the nodes
    whose updates came."""
    nodes = dict(nodes)
    keys = sorted(tensors)
    deadline = time.monotonic() + campaign.round_timeout
    plan = plan_round(campaign, keys, nodes, roster.pace(nodes) if roster else None)
    events("plan", round=round_, coverage=plan.coverage(), quorum=quorum(campaign, len(plan.shards)),
           shards=[{"node": s.node_id[:16], "lane": s.lane, "start": s.start, "end": s.end,
                    "keys": len(shard_keys(plan, s.node_id, keys))} for s in plan.shards])
    short = coverage_shortfall(campaign, min(plan.coverage()))
    if short:
        events("coverage_short", round=round_, wanted=campaign.min_coverage, have=min(plan.coverage()),
               reason=short)
    work = {s.node_id: shard_keys(plan, s.node_id, keys) for s in plan.shards}
    got = train_nodes(grid, campaign, round_, tensors, work, nodes, events, str(round_), roster,
                      Closing(deadline, quorum(campaign, len(work))))
    for attempt in range(1, MAX_REJOINS + 1):
        missing = {key: nodes[key][0] for key in work if key not in got}
        # a round short of min_nodes waits for their rejoin (to its deadline); one that closed with enough
        # goes on: a span coverage needs goes to a warm lane neighbour, not to a node starting up again
        if len(got) >= campaign.min_nodes or not roster or not missing:
            break
        back = await_rejoin(grid, roster, missing, campaign, round_, events, deadline)
        if not back:
            break
        adopt(nodes, back, round_, events, roster)
        got.update(train_nodes(grid, campaign, round_, tensors, {k: work[k] for k in back}, nodes, events,
                               f"{round_}.rejoin{attempt}", roster, Closing(deadline)))
    # catch-up sub-rounds, for the spans coverage needs, get round_timeout of their own once the round closed
    plan = catch_up(grid, campaign, round_, tensors, plan, got, nodes, events, roster,
                    time.monotonic() + campaign.round_timeout)
    return got, without(plan, [s.node_id for s in plan.shards if s.node_id not in got])


def short_of(plan: Plan, missing: list[str], want: int) -> list[str]:
    """The missing nodes whose spans hold a layer that the others give fewer than `want` trainers (or
    fewer than it was planned with, when that is less)."""
    planned = plan.coverage()
    have = without(plan, missing).coverage()
    short = {i for i, (h, p) in enumerate(zip(have, planned)) if h < min(want, p)}
    return [m for m in missing if short & set(range(plan.shard(m).start, plan.shard(m).end + 1))]


def catch_up(grid: Any, campaign: Campaign, round_: int, tensors: dict[str, np.ndarray], plan: Plan,
             got: dict[str, tuple[Update, dict]], nodes: Nodes, events: Events, roster: Roster | None,
             deadline: float) -> Plan:
    """Catch-up sub-rounds: the spans of missing nodes that coverage needs go to their lane neighbours
    (`got` grows by what they send) until no layer is short, no one is left or the deadline passed; the
    other missing nodes' spans are left to the lanes that cover them. Returns the plan as trained."""
    keys = sorted(tensors)
    sub = 0
    while missing := [s.node_id for s in plan.shards if s.node_id not in got]:
        needed = short_of(plan, missing, campaign.min_coverage)
        plan = without(plan, [m for m in missing if m not in needed])
        # nothing short, no one left to take the spans (the runner tries the round again), or out of time
        if not needed or len(needed) == len(plan.shards) or time.monotonic() >= deadline:
            break
        new = reassign(plan, needed)
        extra = {s.node_id: sorted(set(shard_keys(new, s.node_id, keys))
                                   - set(shard_keys(plan, s.node_id, keys)))
                 for s in new.shards}
        extra = {k: v for k, v in extra.items() if v}
        events("reassigned", round=round_, dropped=[m[:16] for m in needed],
               to={k[:16]: len(v) for k, v in extra.items()}, coverage=new.coverage())
        plan = new
        if not extra:
            break
        sub += 1
        more = train_nodes(grid, campaign, round_, tensors, extra, nodes, events, f"{round_}.{sub}", roster,
                           Closing(deadline))
        for key in extra:
            if key in more:
                got[key] = merge(got[key], more[key])
            else:  # it took the work and failed it: its own span is lost too, so reassign again
                got.pop(key, None)
    return plan
