"""Aggregation under a shard plan: each key over only the nodes whose shard includes it.

    >>> new, report = aggregate_sharded(global_adapter, updates, plan)   # plan: coordinator.plan.make_plan

Keys are grouped by the set of nodes that sent them, and each group ("part") is one rule call; each
part's report is in `report.parts`, merged into the top-level fields. Before the keys are split, a
node's whole upload is judged once: central DP clips it to dp.clip jointly (`_clip_jointly`), the robust
rule bounds its delta RMS against the round's (`Robust.clip_round`).

    lane 0: node a layers 0-9,  node b layers 10-29    part 1: layers 0-9,   averaged over {a, c}
    lane 1: node c layers 0-14, node d layers 15-29    part 2: layers 10-14, averaged over {b, c}
                                                       part 3: layers 15-29, averaged over {b, d}
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from coordinator import privacy
from coordinator.plan import Plan, shard_keys
from coordinator.rules import aggregate, create
from coordinator.rules.toolkit import (
    AggregateConfig,
    AggregateReport,
    Float32,
    Tensors,
    Update,
    check_update,
)


def aggregate_sharded(
    global_tensors: Tensors,
    updates: list[Update],
    plan: Plan,
    rule: str = "robust",
    config: AggregateConfig | None = None,
) -> tuple[Tensors, AggregateReport]:
    """Aggregate each key over only the nodes whose shard includes it, one rule call per key group. A node
    that sends keys outside its shard, or a broken tensor, is rejected for every group. Raises CommonsError
    for an unknown rule or a bad setting."""
    judge = create(rule, config)
    keys = sorted(global_tensors)
    expected = {s.node_id: shard_keys(plan, s.node_id, keys) for s in plan.shards}
    report = AggregateReport(rule=rule)
    sent = _in_shard(global_tensors, updates, expected, report)
    if judge.config.dp is not None:
        _clip_jointly(global_tensors, sent, expected, judge.config.dp.clip, report)
    else:
        judge.clip_round(global_tensors, sent, expected, report)
    new: Tensors = {}
    for i, (members, ks) in enumerate(_groups(keys, sent, expected)):
        sub = {k: global_tensors[k] for k in ks}
        if not members:
            new.update({k: np.array(v, dtype=np.float32) for k, v in sub.items()})
            report.unchanged += ks
            continue
        part_updates = [Update(n, Float32(sent[n].tensors, ks), sent[n].num_examples) for n in members]
        tensors, part = aggregate(sub, part_updates, rule, _part_config(config, i))
        new.update(tensors)
        report.parts.append(part)
    _merge_parts(report)
    if judge.config.dp is not None and report.parts:
        report.dp = {**privacy.report(judge.config.dp, len(report.accepted)), "parts": len(report.parts)}
    return new, report


def _in_shard(global_tensors: Tensors, updates: list[Update], expected: dict[str, list[str]],
              report: AggregateReport) -> dict[str, Update]:
    """One update per planned node carrying exactly its shard's keys; the rest rejected with a reason."""
    sent: dict[str, Update] = {}
    for u in updates:
        if u.node_id not in expected:
            report.rejected[u.node_id] = (
                "not in this round's shard plan; the node must fetch the current plan"
            )
        elif u.node_id in sent or u.node_id in report.rejected:
            report.rejected[u.node_id] = "sent more than one update this round"
            sent.pop(u.node_id, None)
        elif why := check_update({k: global_tensors[k] for k in expected[u.node_id]}, u):
            report.rejected[u.node_id] = why
        else:
            sent[u.node_id] = u
    return sent


def _groups(keys: list[str], sent: dict[str, Update],
            expected: dict[str, list[str]]) -> list[tuple[tuple[str, ...], list[str]]]:
    """(the nodes that sent a key, the keys they all sent), sorted; keys nobody sent have no nodes."""
    owners: dict[str, list[str]] = {k: [] for k in keys}
    for nid in sent:
        for k in expected[nid]:
            owners[k].append(nid)
    groups: dict[tuple[str, ...], list[str]] = {}
    for k in keys:
        groups.setdefault(tuple(sorted(owners[k])), []).append(k)
    return sorted(groups.items())


def _clip_jointly(
    global_tensors: Tensors, sent: dict[str, Update], expected: dict[str, list[str]], clip: float,
    report: AggregateReport,
) -> None:
    """Central DP with shards: clip each node's WHOLE upload (its span plus any span it took over in a
    catch-up sub-round: all of `expected[node]`) to `clip` once, before its keys are split into parts.
    Each part's `aggregate` then adds N(0, (σ·clip)²) to every coordinate of its sum (and divides by
    its own number of contributors). Viewed on the concatenated adapter, adding or removing one node
    moves the sums by at most `clip` in L2 in total, and every coordinate carries independent noise of
    std σ·clip: one Gaussian mechanism with sensitivity `clip`, exactly the whole-adapter case, so
    `coordinator.privacy.epsilon` reports the same (ε, δ). Clipping per part instead would give a node
    spanning k parts a sensitivity of sqrt(k)·clip. The per-part clip inside `aggregate` is then a no-op.
    """
    for nid in list(sent):
        u = sent[nid]
        g = {k: np.asarray(global_tensors[k], dtype=np.float32) for k in expected[nid]}
        clipped = privacy.clip_update(g, u.tensors, clip)
        if clipped is None:
            report.rejected[nid] = "NaN, Inf or overflowing values; the node must reset to the global adapter"
            del sent[nid]
            continue
        tensors, factor = clipped
        if factor < 1.0:
            report.clipped[nid] = factor
        sent[nid] = Update(nid, tensors, u.num_examples)


def _part_config(config: AggregateConfig | None, index: int) -> AggregateConfig | None:
    """A seeded config gives each part its own stream: the same seed in every part would add the same
    noise to same-shaped parts, and DP needs the noise of different coordinates independent."""
    if config is None or config.seed is None or config.dp is None:
        return config
    seed = int(np.random.SeedSequence([config.seed, index]).generate_state(1)[0])
    return replace(config, seed=seed)


def _merge_parts(report: AggregateReport) -> None:
    seen: dict[str, list[float]] = {}
    for part in report.parts:
        report.rule = part.rule
        for nid, why in part.rejected.items():
            report.rejected.setdefault(nid, why)
        for nid, f in part.clipped.items():
            report.clipped[nid] = min(f, report.clipped.get(nid, 1.0))
        for nid, n in part.excluded.items():
            report.excluded[nid] = report.excluded.get(nid, 0) + n
        for nid, w in part.weights.items():
            seen.setdefault(nid, []).append(w)
        report.residuals.update(part.residuals)
        report.unchanged += part.unchanged
        report.dp = part.dp or report.dp
    report.accepted = sorted(n for n in seen if n not in report.rejected)
    report.weights = {n: float(np.mean(seen[n])) for n in report.accepted}  # mean over its key groups
    report.unchanged.sort()
