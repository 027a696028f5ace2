"""One round on the Flower Grid: ask the nodes what they can do, plan shards, send each node its keys,
verify and decode the signed replies, and re-send dropped nodes' spans to their lane neighbours.

Nodes are known by their ed25519 public key (hex) here and in the plan; Flower node ids only address
messages. Every reply is checked (signature over the bytes sent, the shard's exact keys, the campaign's
upload encoding) before anything else reads it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
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
)
from coordinator.rules import Update
from protocol.errors import CommonsError, VerifyError
from protocol.instruction import NodeInfo, TrainInstruction
from protocol.packed import pack, unpack
from protocol.signing.keys import verify_signature
from protocol.update import decode, update_digest

Events = Callable[..., None]
Nodes = dict[str, tuple[int, dict]]  # public key hex -> (Flower node id, capability)


def query_nodes(grid: Any, node_ids: list[int], timeout: float,
                events: Events | None = None) -> dict[int, dict]:
    """What each node says it is; a node whose ClientApp raised (bad local data, a broken install) is left
    out, with its own one-line reason in the events."""
    messages = [
        Message(RecordDict({"config": ConfigRecord({"want": "info"})}), dst_node_id=n, message_type="query")
        for n in node_ids
    ]
    infos = {}
    for dst, reply in exchange(grid, messages, timeout):
        if not reply.has_error():
            infos[dst] = dict(reply.content["info"])
        elif events is not None and reply.error.code != ErrorCode.NODE_UNAVAILABLE:
            events("node_ignored", node=f"flower:{dst}", reason=error_text(reply.error.reason))
    return infos


def tell_the_end(grid: Any, campaign: str, outcome: str, timeout: float = 15.0) -> int:
    """Tell every connected volunteer the campaign is over and how it ended ("published NAME vN …"), so its
    status line says so instead of waiting for a next round; returns how many answered. Best effort: a
    volunteer that misses it still shows its last round."""
    config = ConfigRecord({"campaign": campaign, "outcome": outcome})
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type="query.ended")
                for n in grid.get_node_ids()]
    return sum(not reply.has_error() for _, reply in exchange(grid, messages, timeout))


def error_text(reason: str) -> str:
    """The node's own message out of Flower's "<class 'module.Error'>:<'message'>" (first line, short)."""
    match = re.fullmatch(r"<class '([\w.]+)'>:<'(.*)'>", reason.strip(), re.DOTALL)
    if not match:
        return reason.strip().splitlines()[0][:300] if reason.strip() else "no reason given"
    kind, message = match.group(1).rsplit(".", 1)[-1], match.group(2).strip()
    line = message.splitlines()[0] if message else ""
    return (line if kind in ("CommonsError", "VerifyError") else f"{kind}: {line}")[:300]


def _caps(info: dict) -> dict:
    """The capability report of a query answer (protocol.instruction.NodeInfo), as the plan reads it."""
    return NodeInfo.from_config(info).capability.to_report()


def capabilities(infos: dict[int, dict], events: Events) -> dict[str, tuple[int, dict]]:
    """public key -> (Flower node id, capability); one entry per key. `infos` comes in the order the ids
    were first seen: when two ids claim one key, the later one wins (a restarted node, whose old id the
    SuperLink still lists until its heartbeat lapses)."""
    nodes: dict[str, tuple[int, dict]] = {}
    for flower_id, info in infos.items():
        key = str(info.get("public_key", ""))
        try:
            caps = _caps(info)
        except CommonsError as exc:
            events("node_ignored", node=key[:16], reason=str(exc)[:200])
            continue
        if key in nodes:
            events("node_ignored", node=key[:16],
                   reason=f"node {nodes[key][0]} is replaced by a later node with the same key")
        nodes[key] = (flower_id, caps)
    return nodes


class Roster:
    """What each Flower node id said it is, kept across rounds: a query starts a ClientApp process on the
    node, and one to a node that just dropped costs the whole query timeout, so only new ids are asked."""

    def __init__(self, events: Events | None = None) -> None:
        self.events = events
        self.infos: dict[int, dict] = {}  # in the order first seen
        self.unanswered: set[int] = set()  # asked during this round, no answer: not asked again this round

    def refresh(self, grid: Any, listed: list[int], timeout: float) -> dict[int, dict]:
        """Forget ids the grid no longer lists, query the new ones; the infos of the listed ids."""
        self.unanswered = set()
        return self.update(grid, listed, timeout)

    def update(self, grid: Any, listed: list[int], timeout: float) -> dict[int, dict]:
        """Like `refresh`, but ids that did not answer (or answered with an error) this round are not
        asked again: a node with bad data is told once, not at every poll."""
        ids = set(listed)
        self.infos = {i: info for i, info in self.infos.items() if i in ids}
        new = sorted(ids - set(self.infos) - self.unanswered)
        if new:
            answers = query_nodes(grid, new, timeout, self.events)
            self.infos.update(sorted(answers.items()))
            self.unanswered |= set(new) - set(answers)
        return dict(self.infos)

    def suspect(self, flower_id: int) -> None:
        """It did not answer a train message: ask it again next round (a dead node that is still listed
        must not be planned from its old answer), not during this one."""
        self.infos.pop(flower_id, None)
        self.unanswered.add(flower_id)

    def rejoined(self, grid: Any, waiting: dict[str, int], timeout: float) -> dict[str, tuple[int, dict]]:
        """Nodes of `waiting` (public key -> the Flower id we wait on) that reconnected: an id first seen
        after that one (or while that one is no longer listed) claims the same key; the latest wins."""
        infos = self.update(grid, list(grid.get_node_ids()), timeout)
        passed = {key for key, flower_id in waiting.items() if flower_id not in infos}
        found = {}
        for flower_id, info in infos.items():
            key = str(info.get("public_key", ""))
            if key not in waiting:
                continue
            if flower_id == waiting[key]:
                passed.add(key)
            elif key in passed:
                try:
                    found[key] = (flower_id, _caps(info))
                except CommonsError:
                    continue
        return found


MAX_REJOINS = 3  # re-sends per round to nodes that came back: each needs a restart, each may cost a timeout
POLL_SECONDS = 3.0  # between pulls, as Flower's own send_and_receive
QUERY_SECONDS = 30.0  # a reconnected node starts a ClientApp to answer: imports torch, reads its data


def exchange(grid: Any, messages: list[Message], timeout: float,
             more: Callable[[set[int]], tuple[set[int], list[Message]]] | None = None
             ) -> Iterator[tuple[int, Message]]:
    """Send `messages`; yield (destination node id, reply) as replies arrive, until each is answered or
    `timeout` passed since it was sent. Between polls `more(destinations still pending)` names the ones
    not worth waiting for and messages to send now (each gets its own `timeout`).

    Flower 1.42's SuperLink answers for a destination that stopped heartbeating (a SuperNode pings every
    30 s, patience 2) with an error reply, NODE_UNAVAILABLE: a killed node costs up to ~60 s, not the
    whole timeout. A SuperNode stopped cleanly deregisters and is answered for at once. A node that came
    back under a new id never answers on its old one: `more` stops that wait at once."""
    if not hasattr(grid, "push_messages"):  # a Grid with only the blocking call: the in-process test grid
        for reply in grid.send_and_receive(messages, timeout=timeout):
            yield reply.metadata.src_node_id, reply
        return
    pending: dict[str, tuple[int, float]] = {}  # message id -> (destination, deadline)

    def push(batch: list[Message]) -> None:
        deadline = time.monotonic() + timeout
        ids = grid.push_messages(batch) if batch else []
        pending.update({mid: (m.metadata.dst_node_id, deadline)
                        for mid, m in zip(ids, batch, strict=True) if mid})

    push(messages)
    while pending:
        for reply in grid.pull_messages(list(pending)):
            sent = pending.pop(reply.metadata.reply_to_message_id, None)
            if sent is not None:
                yield sent[0], reply
        now = time.monotonic()
        for mid in [mid for mid, (_, deadline) in pending.items() if deadline <= now]:
            del pending[mid]
        if pending and more is not None:
            gone, extra = more({dst for dst, _ in pending.values()})
            for mid in [mid for mid, (dst, _) in pending.items() if dst in gone]:
                del pending[mid]
            push(extra)
        if pending:
            time.sleep(max(0.0, min(POLL_SECONDS, min(d for _, d in pending.values()) - time.monotonic())))


def plan_round(campaign: Campaign, keys: list[str], nodes: dict[str, tuple[int, dict]]) -> Plan:
    """Spans sized to hardware ("auto"), or every node training the whole adapter ("none")."""
    caps = {key: c for key, (_, c) in nodes.items()}
    coverage = campaign.min_coverage if campaign.shards == "auto" else len(caps)
    floors = memory_floors(campaign, caps)  # how low each node's memory lets its span start
    return make_plan(layers_from_keys(keys), caps, min_coverage=max(1, coverage), floors=floors)


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


def adopt(nodes: Nodes, back: Nodes, round_: int, events: Events) -> None:
    """Nodes that reconnected under a new Flower id: address them there from now on."""
    for key, node in back.items():
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
) -> dict[str, tuple[Update, dict]]:
    """Send each node the global adapter and the keys it trains; the verified replies, by public key.
    The whole adapter goes down (a node's forward pass needs the current frozen layers too); only the
    node's shard comes back up. With a `roster`, a node seen reconnecting under a new id (same key) is
    sent its shard again at once and not waited for on its old id; `nodes` is updated to the new id."""
    payload = ArrayRecord({k: Array(v) for k, v in pack(tensors).items()})  # two arrays, not hundreds
    owner: dict[int, str] = {}
    groups: dict[str, str] = {}
    order = sorted(nodes)

    def message(key: str, flower_id: int, grp: str) -> Message:
        owner[flower_id], groups[key] = key, grp
        instruction = train_instruction(campaign, round_, work[key], (order.index(key), len(order)))
        config = ConfigRecord(instruction.to_config())
        return Message(RecordDict({"adapter": payload, "config": config}), dst_node_id=flower_id,
                       message_type="train", group_id=grp)

    messages = [message(key, nodes[key][0], group) for key in work]
    got: dict[str, tuple[Update, dict]] = {}
    why: dict[str, str] = {}
    rejoins = dict.fromkeys(work, 0)

    def rejoin(pending: set[int]) -> tuple[set[int], list[Message]]:
        """Stop waiting on the old id of a node that reconnected and send it its own shard again, at once:
        the same work, so it resumes from its own checkpoint."""
        waiting = {owner[d]: d for d in pending if d in owner and rejoins[owner[d]] < MAX_REJOINS}
        back = (roster.rejoined(grid, waiting, min(QUERY_SECONDS, campaign.round_timeout))
                if roster and waiting else {})
        adopt(nodes, back, round_, events)
        extra = []
        for key, node in back.items():
            rejoins[key] += 1
            extra.append(message(key, node[0], f"{group}.rejoin{rejoins[key]}"))
        return {waiting[key] for key in back}, extra

    for flower_id, reply in exchange(grid, messages, campaign.round_timeout, rejoin):
        key = owner.get(flower_id)
        if key is None or key in got:
            continue
        if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
            why[key] = "it left the network: stopped, or its heartbeat lapsed"  # missing, not a bad update
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
        if key not in got:
            if roster is not None:
                roster.suspect(nodes[key][0])
            events("node_missing", round=round_, group=groups[key], node=key[:16],
                   reason=why.get(key, "no reply in time"))
    return got


def merge(main: tuple[Update, dict], extra: tuple[Update, dict]) -> tuple[Update, dict]:
    """A node's main shard plus the span it took over in a catch-up sub-round: one update."""
    (u, m), (x, n) = main, extra
    metrics = {**m, "tokens": int(m.get("tokens", 0)) + int(n.get("tokens", 0)),
               "upload_bytes": int(m.get("upload_bytes", 0)) + int(n.get("upload_bytes", 0))}
    return Update(u.node_id, {**u.tensors, **x.tensors}, u.num_examples), metrics


def coverage_shortfall(campaign: Campaign, have: int) -> str:
    """Why fewer trainers per layer than min_coverage matter, in one line ("" when there are enough)."""
    if have >= campaign.min_coverage:
        return ""
    return (f"min_coverage = {campaign.min_coverage} but only {have} volunteer{'s' * (have != 1)} train each "
            "layer this round: too few to out-vote a bad one (start more volunteers, or lower min_coverage "
            "to accept it)")


def await_rejoin(grid: Any, roster: Roster, missing: dict[str, int], campaign: Campaign, round_: int,
                 events: Events, until: float | None) -> Nodes:
    """Missing nodes seen back under a new Flower id; with `until`, poll for them until then."""
    said = False
    while True:
        back = roster.rejoined(grid, missing, min(QUERY_SECONDS, campaign.round_timeout))
        if back or until is None or time.monotonic() >= until:
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
    """Train every shard. A node that dropped and reconnected (same key, new Flower id; `roster` finds it)
    is re-sent its own shard: the same work, so it resumes from its own checkpoint. The spans of nodes
    still missing go to lane neighbours in catch-up sub-rounds until every layer is covered by the nodes
    that answered (or no one is left)."""
    nodes = dict(nodes)
    keys = sorted(tensors)
    deadline = time.monotonic() + campaign.round_timeout
    plan = plan_round(campaign, keys, nodes)
    events("plan", round=round_, coverage=plan.coverage(), shards=[
        {"node": s.node_id[:16], "lane": s.lane, "start": s.start, "end": s.end,
         "keys": len(shard_keys(plan, s.node_id, keys))} for s in plan.shards])
    short = coverage_shortfall(campaign, min(plan.coverage()))
    if short:
        events("coverage_short", round=round_, wanted=campaign.min_coverage, have=min(plan.coverage()),
               reason=short)
    work = {s.node_id: shard_keys(plan, s.node_id, keys) for s in plan.shards}
    got = train_nodes(grid, campaign, round_, tensors, work, nodes, events, str(round_), roster)
    for attempt in range(1, MAX_REJOINS + 1):
        missing = {key: nodes[key][0] for key in work if key not in got}
        # a round that cannot reach min_nodes without them waits for their rejoin (to the round's deadline)
        until = deadline if len(got) < campaign.min_nodes else None
        back = (await_rejoin(grid, roster, missing, campaign, round_, events, until)
                if roster and missing else {})
        if not back:
            break
        adopt(nodes, back, round_, events)
        got.update(train_nodes(grid, campaign, round_, tensors, {k: work[k] for k in back}, nodes, events,
                               f"{round_}.rejoin{attempt}", roster))
    sub = 0
    while missing := [s.node_id for s in plan.shards if s.node_id not in got]:
        # no one left to take the spans: the runner tries the round again
        if len(missing) == len(plan.shards):
            break
        new = reassign(plan, missing)
        extra = {s.node_id: sorted(set(shard_keys(new, s.node_id, keys))
                                   - set(shard_keys(plan, s.node_id, keys)))
                 for s in new.shards}
        extra = {k: v for k, v in extra.items() if v}
        events("reassigned", round=round_, dropped=[m[:16] for m in missing],
               to={k[:16]: len(v) for k, v in extra.items()}, coverage=new.coverage())
        plan = new
        if not extra:
            break
        sub += 1
        more = train_nodes(grid, campaign, round_, tensors, extra, nodes, events, f"{round_}.{sub}", roster)
        for key in extra:
            if key in more:
                got[key] = merge(got[key], more[key])
            else:  # it took the work and failed it: its own span is lost too, so reassign again
                got.pop(key, None)
    return got, plan
