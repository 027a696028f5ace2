"""Shard plan: which layers each node trains this round, so every layer is trained every round.

    >>> layers = layers_from_keys(global_adapter.keys())
    >>> plan = make_plan(layers, {"a": {"device": "cuda", "vram_gb": 24, "cpu_cores": 8, "ram_gb": 64},
    ...                           "b": {"device": "cpu", "vram_gb": None, "cpu_cores": 4, "ram_gb": 16}})
    >>> plan.to_json()            # ship to nodes in a Flower ConfigRecord as a string
    >>> shard_keys(plan, "a", global_adapter.keys())
    >>> plan = reassign(plan, {"b"})   # b dropped mid-round: a's span grows to cover b's layers

Aggregating under a plan (each key over its trainers) is `coordinator.rules.sharded.aggregate_sharded`.

Layout: nodes are split into `lanes` (LPT on capability score); each lane tiles the layer stack with
contiguous spans, so each lane covers every layer exactly once and the coverage of every layer equals the
number of lanes: min(min_coverage, number of nodes), more when there are more nodes than layers.
Within a lane the strongest node gets the lowest layers: a span starting at layer i needs the backward
pass from the top down to i, so low spans cost the most. Span lengths are proportional to score.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from coordinator.campaign import Campaign
from coordinator.rules.toolkit import split_key
from modeling.load import model_config
from modeling.memory import Device, ModelShape, Workload, lowest_first_layer
from protocol.errors import CommonsError

PLAN_VERSION = 1
_LAYER = re.compile(r"\.layers\.(\d+)\.")
DEVICES = ("cuda", "mps", "cpu")


def layers_from_keys(keys: Iterable[str]) -> list[tuple[int, list[str]]]:
    """Group LoRA module prefixes by transformer layer index, ascending; modules outside `.layers.N.`
    (e.g. lm_head) form one last group with index -1."""
    by_layer: dict[int, set[str]] = {}
    for key in keys:
        prefix, ab = split_key(key)
        if ab is None:
            continue
        m = _LAYER.search(prefix + ".")
        by_layer.setdefault(int(m.group(1)) if m else -1, set()).add(prefix)
    order = sorted(i for i in by_layer if i >= 0) + ([-1] if -1 in by_layer else [])
    return [(i, sorted(by_layer[i])) for i in order]


def capability_score(caps: Mapping) -> float:
    """Rough relative training throughput of a node (only the ratios between nodes matter)."""
    device = caps.get("device")
    if device not in DEVICES:
        raise CommonsError(f"node capability device must be one of {', '.join(DEVICES)}, got {device!r}")
    try:
        cores = max(1, int(caps.get("cpu_cores") or 1))
        ram = float(caps.get("ram_gb") or 0.0)
        vram = float(caps.get("vram_gb") or 8.0)
    except (TypeError, ValueError) as e:
        raise CommonsError(
            f"node capability numbers are malformed ({e}); report cpu_cores, ram_gb, vram_gb"
        ) from e
    if device == "cuda":
        return 16.0 + 2.0 * vram
    if device == "mps":  # unified memory: the GPU gets a share of system RAM
        return 8.0 + 0.5 * ram
    return 0.5 * cores + 0.05 * ram


@dataclass(frozen=True)
class Shard:
    node_id: str
    lane: int
    start: int  # position in Plan.layers, inclusive
    end: int  # inclusive
    score: float


@dataclass(frozen=True)
class Plan:
    layers: list[tuple[int, list[str]]]  # (layer index, module prefixes), in stack order
    shards: list[Shard]
    min_coverage: int

    def shard(self, node_id: str) -> Shard:
        for s in self.shards:
            if s.node_id == node_id:
                return s
        raise CommonsError(
            f"node {node_id!r} has no shard in this plan; ask the coordinator for the current plan"
        )

    def prefixes(self, node_id: str) -> list[str]:
        s = self.shard(node_id)
        return [p for _, mods in self.layers[s.start : s.end + 1] for p in mods]

    def coverage(self) -> list[int]:
        """How many nodes train each layer position."""
        cov = [0] * len(self.layers)
        for s in self.shards:
            for i in range(s.start, s.end + 1):
                cov[i] += 1
        return cov

    def to_json(self) -> str:
        """Canonical encoding: same plan, same bytes."""
        body = {
            "version": PLAN_VERSION,
            "min_coverage": self.min_coverage,
            "layers": [{"index": i, "modules": list(mods)} for i, mods in self.layers],
            "shards": [asdict(s) for s in sorted(self.shards, key=lambda s: (s.lane, s.start, s.node_id))],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        try:
            body = json.loads(text)
            if body["version"] != PLAN_VERSION:
                raise ValueError(f"version {body['version']}")
            layers = [(int(x["index"]), [str(m) for m in x["modules"]]) for x in body["layers"]]
            shards = [
                Shard(str(s["node_id"]), int(s["lane"]), int(s["start"]), int(s["end"]), float(s["score"]))
                for s in body["shards"]
            ]
            plan = cls(layers, shards, int(body["min_coverage"]))
        except (ValueError, KeyError, TypeError) as e:
            raise CommonsError(
                f"shard plan JSON is invalid ({e}); ask the coordinator for a fresh plan"
            ) from e
        if any(not 0 <= s.start <= s.end < len(layers) for s in shards):
            raise CommonsError(
                "shard plan has a span outside its layers; ask the coordinator for a fresh plan"
            )
        return plan


def split_sizes(scores: list[float], total: int) -> list[int]:
    """Split `total` layers into len(scores) spans of >= 1, proportional to score (largest remainder)."""
    n = len(scores)
    if not 1 <= n <= total:
        raise CommonsError(f"cannot split {total} layers among {n} nodes; each node needs at least one layer")
    weight = sum(scores)
    raw = [total * s / weight for s in scores]
    sizes = [max(1, math.floor(r)) for r in raw]
    while sum(sizes) > total:  # the floor-at-1 overshot: shrink the most over-served span
        i = max((j for j in range(n) if sizes[j] > 1), key=lambda j: (sizes[j] - raw[j], -j))
        sizes[i] -= 1
    while sum(sizes) < total:
        i = max(range(n), key=lambda j: (raw[j] - sizes[j], -j))
        sizes[i] += 1
    return sizes


def make_plan(
    layers: list[tuple[int, list[str]]], nodes: Mapping[str, Mapping], min_coverage: int = 2,
    floors: Mapping[str, int | None] | None = None, pace: Mapping[str, float] | None = None,
) -> Plan:
    """Assign every node one contiguous span; every layer is covered by each lane.

    `pace` (from `rounds.Roster.pace`): a multiplier on a node's score, below 1 for a node that missed its
    last deadlines, so it is asked for fewer layers (spans are proportional to score).

    `floors` (from `memory_floors`): the lowest layer index each node's memory lets its span start at, None
    for a node that cannot train even the top layer. Such a node gets no span; a lane starts with a node
    that can hold the whole backward pass, and a span is pushed up to its node's floor (the span below it
    grows upwards, which costs that node no activation memory). Without floors every node may start at 0."""
    if not layers:
        raise CommonsError("no LoRA modules to plan over; pass layers_from_keys(global adapter keys)")
    if not nodes:
        raise CommonsError("no nodes to plan for; wait until at least one node has joined")
    if min_coverage < 1:
        raise CommonsError(f"min_coverage must be >= 1, got {min_coverage}")
    floor = _positions(layers, nodes, floors)
    able = [nid for nid in nodes if floor[nid] is not None]
    bottom = [nid for nid in able if floor[nid] == 0]
    if not bottom:
        raise CommonsError("no volunteer has the memory to train the lowest layers of this model "
                           "(`commons node plan` says what it needs): volunteers with more memory must join, "
                           "or lower train.max_length or train.batch_size")
    n_layers, n_nodes = len(layers), len(able)
    lanes = min(max(min(n_nodes, min_coverage), math.ceil(n_nodes / n_layers)), len(bottom))
    # each lane opens with a node that can train layer 0, then LPT: the next strongest node joins the
    # weakest lane that still has room
    pace = pace or {}
    scored = sorted(((capability_score(nodes[nid]) * pace.get(nid, 1.0), nid) for nid in able),
                    key=lambda x: (floor[x[1]] > 0, -x[0], x[1]))
    members: list[list[tuple[float, str]]] = [[] for _ in range(lanes)]
    for score, nid in scored:
        open_lanes = [j for j in range(lanes) if len(members[j]) < n_layers]
        if not open_lanes:
            break
        j = min(open_lanes, key=lambda j: (sum(s for s, _ in members[j]), j))
        members[j].append((score, nid))
    shards = []
    for lane, group in enumerate(members):
        group.sort(key=lambda x: (floor[x[1]], -x[0], x[1]))
        shards += _lane_spans(lane, group, floor, n_layers)
    return Plan([(i, list(m)) for i, m in layers], shards, min_coverage)


def _positions(layers: list[tuple[int, list[str]]], nodes: Mapping[str, Mapping],
               floors: Mapping[str, int | None] | None) -> dict[str, int | None]:
    """Each node's floor as a position in `layers` (layer indices ascend; the -1 group is the top)."""
    if floors is None:
        return dict.fromkeys(nodes, 0)
    out: dict[str, int | None] = {}
    for nid in nodes:
        low = floors.get(nid, 0)
        out[nid] = None if low is None else next(p for p, (i, _) in enumerate(layers) if i >= low or i == -1)
    return out


def _lane_spans(lane: int, group: list[tuple[float, str]], floor: Mapping[str, int | None],
                n_layers: int) -> list[Shard]:
    """Spans proportional to score, each start raised to its node's floor; a node left no room is dropped."""
    starts, at = [], 0
    for size in split_sizes([s for s, _ in group], n_layers):
        starts.append(at)
        at += size
    kept: list[tuple[float, str, int]] = []
    for (score, nid), start in zip(group, starts):
        if kept:
            start = max(start, floor[nid] or 0, kept[-1][2] + 1)
        if start < n_layers:
            kept.append((score, nid, start))
    ends = [start - 1 for _, _, start in kept[1:]] + [n_layers - 1]
    return [Shard(nid, lane, start, end, score) for (score, nid, start), end in zip(kept, ends)]


def memory_floors(campaign: Campaign, nodes: Mapping[str, Mapping]) -> dict[str, int | None]:
    """The lowest layer each node's memory lets its span start at, from the same estimate the node checks
    before it trains (modeling/memory.py, the model's config.json and the node's capability report)."""
    config = model_config(campaign.base_model, campaign.base_revision)
    shape = ModelShape.from_config(config, name=campaign.base_model)
    work = Workload(batch_size=campaign.train.batch_size, max_length=campaign.train.max_length,
                    lora_r=campaign.lora.r, lora_dropout=campaign.lora.dropout,
                    targets=tuple(campaign.lora.target_modules))
    return {nid: lowest_first_layer(shape, work, Device.from_capability(dict(caps)), campaign.quantization)
            for nid, caps in nodes.items()}


def reassign(plan: Plan, dropped: Iterable[str]) -> Plan:
    """Give dropped nodes' spans to the survivors of their lane (neighbours grow), keeping spans
    contiguous and every layer covered; a lane with no survivor disappears (coverage drops by one
    until the next make_plan)."""
    gone = set(dropped)
    last = len(plan.layers) - 1
    shards: list[Shard] = []
    for lane in sorted({s.lane for s in plan.shards}):
        alive = sorted(
            (s for s in plan.shards if s.lane == lane and s.node_id not in gone), key=lambda s: s.start
        )
        if not alive:
            continue
        starts = [s.start for s in alive]
        ends = [s.end for s in alive]
        starts[0], ends[-1] = 0, last
        for i in range(len(alive) - 1):
            gap = starts[i + 1] - ends[i] - 1
            if gap > 0:
                left = round(gap * alive[i].score / (alive[i].score + alive[i + 1].score))
                ends[i] += left
                starts[i + 1] = ends[i] + 1
        shards += [Shard(s.node_id, s.lane, a, b, s.score) for s, a, b in zip(alive, starts, ends)]
    if not shards:
        raise CommonsError("every node in the plan dropped out; wait for nodes to rejoin and make a new plan")
    return Plan(plan.layers, shards, plan.min_coverage)


def without(plan: Plan, gone: Iterable[str]) -> Plan:
    """The plan less the shards of `gone`, whose spans nobody takes over: the nodes that did not answer
    where the others already give every layer its coverage."""
    out = set(gone)
    return Plan(plan.layers, [s for s in plan.shards if s.node_id not in out], plan.min_coverage)


def shard_keys(plan: Plan, node_id: str, all_keys: Iterable[str]) -> list[str]:
    """The state-dict keys `node_id` trains and sends back this round (sorted)."""
    mine = set(plan.prefixes(node_id))
    return sorted(k for k in all_keys if split_key(k)[0] in mine)

