"""Who is on the network: messages to nodes with deadlines, what each node says it is, and how each
volunteer kept its deadlines, across a campaign's rounds.

    >>> for dst, reply in exchange(grid, messages, timeout, more):   # replies as they arrive
    >>> roster = Roster(events)                  # one per campaign run
    >>> infos = roster.refresh(grid, ids, 60)    # round start: new ids asked, the answers in by now
    >>> nodes = capabilities(infos, events)      # public key -> (Flower id, capability report)
    >>> roster.pace(nodes)                       # < 1 for volunteers that missed their last deadlines

A query starts the node's ClientApp, and one to a node that just died is answered only when its
heartbeat lapses (~60 s, Flower's SuperLink) or never. So only ids not seen before are asked, and they
are asked without waiting: the answers are collected at every later look (`update`), a round starts
once the others had as long again as the first answer took (`refresh`), and a volunteer that joins
mid-round has answered by the next round's start.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode

from protocol.errors import CommonsError
from protocol.instruction import NodeInfo

Events = Callable[..., None]
Nodes = dict[str, tuple[int, dict]]  # public key hex -> (Flower node id, capability)

POLL_SECONDS = 1.0  # between pulls: a loopback call to our SuperLink; each second here is idle volunteers
QUERY_SECONDS = 30.0  # a reconnected node starts a ClientApp to answer: imports torch, reads its data
QUERY_GRACE = 5.0  # seconds a round start waits at least on queries in flight (a warm node answers in ~1 s)
SLOWEST_PACE = 0.125  # a volunteer that keeps missing deadlines: an eighth of its hardware's share, no less
MIN_PULL = 5.0  # seconds a pull waits at least on a reply's arrays (a query's answer: at most)
UPLOAD_SECONDS = 10.0  # seconds a reply's arrays may take to arrive after the reply, plus 1 s per MB


def pull(grid: Any, message_ids: list[str], seconds: float) -> list[Message]:
    """`grid.pull_messages`, waiting at most `seconds` (about) for the arrays of a reply.

    A SuperNode announces its reply (PushMessages) before it uploads the reply's arrays, and Flower 1.42's
    Grid then waits for them up to PULL_MAX_TIME, two hours, holding every other reply: a volunteer
    SIGKILLed between the two never uploads them, and the whole round would stop there. Bounded, Flower
    answers for that reply with an error (MESSAGE_UNAVAILABLE). A pulled reply is not offered again, so
    the bound must cover a live volunteer's upload (`upload_seconds`)."""
    module = sys.modules.get(type(grid).__module__)
    original = getattr(module, "pull_objects", None)
    if original is None:  # another Grid (the in-process test grid): nothing to bound
        return list(grid.pull_messages(message_ids))
    module.pull_objects = functools.partial(original, max_time=max(MIN_PULL, seconds))
    try:
        return list(grid.pull_messages(message_ids))
    finally:
        module.pull_objects = original


def exchange(grid: Any, messages: list[Message], timeout: float,
             more: Callable[[set[int]], tuple[set[int], list[Message]]] | None = None,
             until: float | None = None, upload: float = UPLOAD_SECONDS) -> Iterator[tuple[int, Message]]:
    """Send `messages`; yield (destination node id, reply) as replies arrive, until each is answered or
    `timeout` passed since it was sent (or `until`, a time.monotonic() deadline, came first). Between
    polls `more(destinations still pending)` names the ones not worth waiting for and messages to send
    now (each gets its own `timeout`). A reply's arrays are waited for `upload` seconds (`pull`).

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
        deadline = time.monotonic() + timeout if until is None else min(time.monotonic() + timeout, until)
        ids = grid.push_messages(batch) if batch else []
        pending.update({mid: (m.metadata.dst_node_id, deadline)
                        for mid, m in zip(ids, batch, strict=True) if mid})

    push(messages)
    held = False
    while pending:
        pulled = time.monotonic()
        for reply in pull(grid, list(pending), upload):
            sent = pending.pop(reply.metadata.reply_to_message_id, None)
            if sent is not None:
                yield sent[0], reply
        now = time.monotonic()
        if pending and not held and now - pulled > POLL_SECONDS:
            held = True  # a reply's upload held the pull: take what came meanwhile before any deadline
            continue
        held = False
        for mid in [mid for mid, (_, deadline) in pending.items() if deadline <= now]:
            del pending[mid]
        if pending and more is not None:
            gone, extra = more({dst for dst, _ in pending.values()})
            for mid in [mid for mid, (dst, _) in pending.items() if dst in gone]:
                del pending[mid]
            push(extra)
        if pending:
            time.sleep(max(0.0, min(POLL_SECONDS, min(d for _, d in pending.values()) - time.monotonic())))


def upload_seconds(upload_bytes: int) -> float:
    """How long a reply's arrays may take to arrive: UPLOAD_SECONDS plus the upload at 1 MB/s (an int8
    quarter of a 7B adapter, 3.4 MB: 13 s)."""
    return UPLOAD_SECONDS + upload_bytes / 1e6


def query_message(node_id: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"want": "info"})}), dst_node_id=node_id,
                   message_type="query")


def query_nodes(grid: Any, node_ids: list[int], timeout: float,
                events: Events | None = None) -> dict[int, dict]:
    """What each node says it is, waiting for every answer; a node whose ClientApp raised (bad local
    data, a broken install) is left out, with its own one-line reason in the events."""
    infos: dict[int, dict] = {}
    for dst, reply in exchange(grid, [query_message(n) for n in node_ids], timeout):
        _take(dst, reply, infos, events)
    return infos


def _take(dst: int, reply: Message, infos: dict[int, dict], events: Events | None) -> bool:
    """Keep a query's answer in `infos`; False (and the node's reason in the events) when it failed."""
    if not reply.has_error():
        infos[dst] = dict(reply.content["info"])
        return True
    if events is not None and reply.error.code != ErrorCode.NODE_UNAVAILABLE:
        events("node_ignored", node=f"flower:{dst}", reason=error_text(reply.error.reason))
    return False


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


def capabilities(infos: dict[int, dict], events: Events) -> Nodes:
    """public key -> (Flower node id, capability); one entry per key. `infos` comes in the order the ids
    answered: when two ids claim one key, the later one wins (a restarted node, whose old id the
    SuperLink still lists until its heartbeat lapses)."""
    nodes: Nodes = {}
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
    """What each Flower node id said it is, and how each volunteer (public key) kept its deadlines."""

    def __init__(self, events: Events | None = None) -> None:
        self.events = events
        self.infos: dict[int, dict] = {}  # in the order answered
        self.unanswered: set[int] = set()  # asked during this round, no answer: not asked again this round
        self.asked: dict[str, tuple[int, float]] = {}  # query message id -> (Flower id, deadline)
        self.misses: dict[str, int] = {}  # public key -> deadlines missed since it last kept one

    def refresh(self, grid: Any, listed: list[int], timeout: float) -> dict[int, dict]:
        """Forget ids the grid no longer lists, ask the new ones; the infos of the listed ids once the
        queries in flight are answered, or the first answer is in and the others had as long again as it
        took (at least QUERY_GRACE): a dead node still listed holds nothing up, busy ones are waited for."""
        self.unanswered = set()
        start = time.monotonic()
        infos = self.update(grid, listed, timeout)
        first = start if infos else None  # when the first answer was in
        while self.asked and time.monotonic() - start < timeout:
            if first is not None and time.monotonic() - first >= max(QUERY_GRACE, first - start):
                break
            time.sleep(POLL_SECONDS)
            infos = self.update(grid, listed, timeout)
            if infos and first is None:
                first = time.monotonic()
        return infos

    def update(self, grid: Any, listed: list[int], timeout: float) -> dict[int, dict]:
        """Like `refresh`, without waiting: answers that came are taken in, new ids are asked, and ids
        that did not answer (or answered with an error) this round are not asked again: a node with bad
        data is told once, not at every poll."""
        ids = set(listed)
        self.infos = {i: info for i, info in self.infos.items() if i in ids}
        if not hasattr(grid, "push_messages"):  # the in-process test grid answers at once
            new = sorted(ids - set(self.infos) - self.unanswered)
            answers = query_nodes(grid, new, timeout, self.events) if new else {}
            self.infos.update(sorted(answers.items()))
            self.unanswered |= set(new) - set(answers)
            return dict(self.infos)
        self._collect(grid)
        asking = {dst for dst, _ in self.asked.values()}
        new = sorted(ids - set(self.infos) - self.unanswered - asking)
        if new:
            deadline = time.monotonic() + timeout
            batch = [query_message(n) for n in new]
            for mid, msg in zip(grid.push_messages(batch), batch, strict=True):
                if mid:
                    self.asked[mid] = (msg.metadata.dst_node_id, deadline)
                else:
                    self.unanswered.add(msg.metadata.dst_node_id)
        return {i: info for i, info in self.infos.items() if i in ids}

    def _collect(self, grid: Any) -> None:
        """Take in the answers to queries in flight; those past their deadline count as unanswered."""
        if self.asked:  # an answer is a few hundred bytes: one not uploaded at once is asked again next round
            for reply in pull(grid, list(self.asked), MIN_PULL):
                sent = self.asked.pop(reply.metadata.reply_to_message_id, None)
                if sent is not None and not _take(sent[0], reply, self.infos, self.events):
                    self.unanswered.add(sent[0])
        now = time.monotonic()
        for mid, (dst, deadline) in list(self.asked.items()):
            if deadline <= now:
                del self.asked[mid]
                self.unanswered.add(dst)

    def suspect(self, flower_id: int) -> None:
        """It did not answer a train message: ask it again next round (a dead node that is still listed
        must not be planned from its old answer), not during this one."""
        self.infos.pop(flower_id, None)
        self.unanswered.add(flower_id)

    def kept(self, key: str) -> None:
        """Volunteer `key` answered in time."""
        self.misses.pop(key, None)

    def missed(self, key: str) -> None:
        """Volunteer `key` missed a deadline (late, dropped or gone): next time it gets half the span."""
        self.misses[key] = self.misses.get(key, 0) + 1

    def pace(self, keys: Nodes | list[str]) -> dict[str, float]:
        """A multiplier on each volunteer's share of the layers: 1/2 per deadline missed since it last kept
        one, down to SLOWEST_PACE (coordinator.plan.make_plan's `pace`)."""
        return {k: max(SLOWEST_PACE, 0.5 ** self.misses[k]) for k in keys if k in self.misses}

    def rejoined(self, grid: Any, waiting: dict[str, int], timeout: float) -> Nodes:
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
