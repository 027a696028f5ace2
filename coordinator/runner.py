"""A campaign's rounds: plan shards, collect signed updates, aggregate per shard, evaluate, publish.

The Flower `Grid` is the only transport (coordinator/rounds.py talks to it and checks every reply).
State (global adapter, the exact rule's residual, curve, ledger) is checkpointed after every round, so a
coordinator killed with -9 resumes after the last completed round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from coordinator import checkpoint, outer, rules
from coordinator.campaign import Campaign
from coordinator.evaluate import exact_match
from coordinator.privacy import DPConfig
from coordinator.publish import record_training, write_adapter
from coordinator.restart import fingerprint
from coordinator.rounds import Nodes, Roster, capabilities, coverage_shortfall, run_round, tell_the_end
from coordinator.rules import AggregateConfig, AggregateReport
from coordinator.rules.sharded import aggregate_sharded
from modeling.load import exact_revision, load_base
from modeling.lora import get_state, set_state, wrap
from protocol.data.records import read_records
from protocol.errors import CommonsError
from protocol.publishing import publish
from protocol.signing.keys import Identity
from protocol.signing.manifest import AdapterMeta

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


ROUND_ATTEMPTS = 3  # a round short of min_nodes valid updates is tried again, after waiting for volunteers
WAIT_SECONDS = 2.0  # between looks at who is connected


def gather(grid: Any, campaign: Campaign, round_: int, roster: Roster, events: Events) -> Nodes:
    """The volunteers usable this round (connected, and their query answered with a sound report).

    Waits up to the patience (`node_wait`) for `min_nodes` of them, querying each new one once; a node
    whose ClientApp raised (bad data, a broken install) is reported with its own reason and left out."""
    deadline = time.monotonic() + campaign.node_wait
    timeout = min(campaign.round_timeout, 60)
    once = _once(events)  # a node with a bad report is named once, not at every look
    listed = sorted(grid.get_node_ids())
    nodes = capabilities(roster.refresh(grid, listed, timeout), once)
    said = None
    while len(nodes) < campaign.min_nodes:
        if (len(listed), len(nodes)) != said:
            events("waiting_for_nodes", round=round_, connected=len(listed), have=len(nodes),
                   want=campaign.min_nodes)
            said = (len(listed), len(nodes))
        if time.monotonic() > deadline:
            raise CommonsError(
                f"round {round_}: only {len(nodes)} of min_nodes={campaign.min_nodes} volunteers could train "
                f"after waiting {campaign.node_wait:.0f}s ({len(listed)} connected): start more nodes, raise "
                "node_wait or lower min_nodes in the campaign file"
            )
        time.sleep(WAIT_SECONDS)
        listed = sorted(grid.get_node_ids())
        nodes = capabilities(roster.update(grid, listed, timeout), once)
    return nodes


def _once(events: Callable[..., None]) -> Callable[..., None]:
    """`events`, but each exact event only the first time."""
    said: set[str] = set()

    def say(event: str, **fields: Any) -> None:
        key = json.dumps([event, fields], sort_keys=True, default=str)
        if key not in said:
            said.add(key)
            events(event, **fields)

    return say


def train_round(grid: Any, campaign: Campaign, round_: int, tensors: dict[str, np.ndarray], roster: Roster,
                events: Events) -> tuple[dict, Any]:
    """At least `min_nodes` verified updates for this round, or a one-line error after ROUND_ATTEMPTS."""
    for attempt in range(1, ROUND_ATTEMPTS + 1):
        nodes = gather(grid, campaign, round_, roster, events)
        events("round_start", round=round_, nodes=len(nodes), attempt=attempt,
               volunteers=sorted(k[:16] for k in nodes))
        got, plan = run_round(grid, campaign, round_, tensors, nodes, events, roster)
        if len(got) >= campaign.min_nodes:
            return got, plan
        events("round_short", round=round_, got=len(got), want=campaign.min_nodes, attempt=attempt)
    raise CommonsError(
        f"round {round_} got fewer than min_nodes={campaign.min_nodes} valid updates in {ROUND_ATTEMPTS} "
        "tries: see `update_dropped`/`node_missing` in the campaign's events.jsonl, start more nodes, raise "
        "round_timeout or lower min_nodes in the campaign file"
    )


def aggregate_config(campaign: Campaign) -> tuple[str, AggregateConfig]:
    dp = None
    if campaign.dp:
        dp = DPConfig(clip=campaign.dp.clip, noise_multiplier=campaign.dp.noise_multiplier,
                      delta=campaign.dp.delta, rounds=campaign.rounds)
    return campaign.aggregation, AggregateConfig(dp=dp)


def stop_early(campaign: Campaign, state: dict) -> str:
    """Why to stop before the next round ("" to go on): `early_stop` rounds without a better eval."""
    best = state.get("best")
    if not campaign.early_stop or not best or state["round"] - best["round"] < campaign.early_stop:
        return ""
    return (f"no better held-out accuracy for {state['round'] - best['round']} round(s) after round "
            f"{best['round']} ({best['accuracy']:.1%}; early_stop = {campaign.early_stop})")


def published_because(state: dict) -> str:
    """Which round is published and why, in one line (the manifest and the events carry it)."""
    best, last = state["best"], state["curve"][-1]
    if best["round"] == last["round"]:
        return f"round {best['round']}, the last, scored best on the held-out set ({best['accuracy']:.1%})"
    return (f"round {best['round']} scored best on the held-out set ({best['accuracy']:.1%}); the last "
            f"round, {last['round']}, scored {last['accuracy']:.1%}")


def joined(events: Events, round_: int, newcomers: set[str], got: dict) -> None:
    """A volunteer's first accepted update: its join time, from `commons node start` (as its node says,
    on its own clock) to now."""
    for key in sorted(newcomers):
        started = float(got[key][1].get("started", 0) or 0)
        seconds = round(time.time() - started, 1) if started > 0 else None
        events("joined", round=round_, node=key[:16], seconds=seconds)


def update_ledger(ledger: dict, accepted: set[str], metrics: dict[str, dict]) -> None:
    for node_id in accepted:
        entry = ledger.setdefault(node_id, {"node": node_id, "rounds": 0, "tokens": 0, "examples": 0})
        entry["rounds"] += 1
        entry["tokens"] += int(metrics[node_id].get("tokens", 0))
        entry["examples"] += int(metrics[node_id].get("num_examples", 0))
        record_training(entry, metrics[node_id])  # quantization and dtype it trained in


def curve_point(round_: int, accepted: set[str], metrics: dict[str, dict], evaluation: dict, report: Any,
                plan: Any) -> dict:
    losses = [float(metrics[n]["loss"]) for n in accepted if n in metrics]
    return {
        "round": round_,
        "loss": float(np.mean(losses)) if losses else None,
        "accuracy": evaluation["accuracy"],
        "accepted": len(accepted),
        "rejected": len(report.rejected),
        "upload_bytes": int(np.mean([int(m.get("upload_bytes", 0)) for m in metrics.values()])),
        "fewest_trainers": min(plan.coverage()),  # per layer, against the campaign's min_coverage
    }


def run(grid: Any, campaign: Campaign, home: Path) -> dict:
    folder = home / "campaigns" / campaign.name
    events = Events(folder / "events.jsonl")
    identity = Identity.load_or_create(home / "identity" / "ed25519.key")
    test = read_records(campaign.eval_file)[: campaign.eval_size]
    events("campaign_start", name=campaign.name, base_model=campaign.base_model, rounds=campaign.rounds,
           aggregation=campaign.aggregation, outer=campaign.outer.optimizer, shards=campaign.shards,
           upload_dtype=campaign.upload_dtype, min_nodes=campaign.min_nodes, node_wait=campaign.node_wait,
           license=campaign.published_license(), license_default=not campaign.license)

    # load the base, then go on after the last saved round of this very campaign or score the base
    base, tokenizer = load_base(campaign.base_model, campaign.base_revision)
    base_revision = exact_revision(campaign.base_model, campaign.base_revision, base)
    rule, config = aggregate_config(campaign)
    scaling = campaign.lora.alpha / campaign.lora.r
    carry = rules.create(rule, config).carry(scaling)  # what it keeps across rounds (exact: its residual)
    saved, state = resume(folder, campaign, base, tokenizer, test, events)
    saved, moments = outer.split(saved) if saved is not None else (None, {})  # the outer optimizer's state
    model, tensors = start_model(base, campaign, saved, carry)

    roster = Roster(events)  # node infos by Flower id across rounds: only ids not seen before are queried
    for round_ in range(state["round"] + 1, campaign.rounds + 1):
        # termination conditions
        if why := stop_early(campaign, state):
            events("early_stop", round=state["round"], best_round=state["best"]["round"], reason=why)
            break
        # query, plan, train: at least min_nodes verified updates, waiting for volunteers within the patience
        got, plan = train_round(grid, campaign, round_, tensors, roster, events)
        # aggregate per key group of the plan, then take the outer optimizer's step
        clock = time.perf_counter()
        tensors, report, moments = aggregate_round(tensors, got, plan, rule, config, carry, campaign.outer,
                                                   moments)
        aggregated = time.perf_counter()
        # evaluate the new global adapter on the held-out set
        evaluation = evaluate(model, tokenizer, test, tensors, carry)
        spent = {"aggregate_seconds": round(aggregated - clock, 2),
                 "eval_seconds": round(time.perf_counter() - aggregated, 2)}
        # record: ledger, curve, the best round so far; who joined with this round's update
        newcomers = set(report.accepted) - set(state["ledger"])
        point, best = record(state, round_, got, evaluation, report, plan)
        joined(events, round_, newcomers, got)
        # checkpoint, then say the round is done
        clock = time.perf_counter()
        saved = outer.join(carry.checkpoint(tensors), moments)
        state = checkpoint.save(folder / "checkpoint", saved, state, best=best)
        spent["checkpoint_seconds"] = round(time.perf_counter() - clock, 2)
        events("round_end", **point, best=best, rejected_nodes=report.rejected, clipped=report.clipped,
               coverage=plan.coverage(), dp=report.dp, **spent)

    # the best round, not the last, in the form PEFT loads
    load_publishable(folder, state, model, tokenizer, test, tensors, carry, events)
    result = finish(campaign, home, model, state, identity, events, base_revision)
    # tell the volunteers how it ended, then say the campaign is over (its watcher stops the run on that)
    tell_the_end(grid, campaign.name, outcome(result))
    events("campaign_end", published=result["published"])
    return result


def outcome(result: dict) -> str:
    """How a campaign ended, in the words a volunteer's status line uses."""
    if result.get("published"):
        return f"published {result['name']} v{result['version']} ({str(result['adapter_cid'])[:12]}…)"
    return str(result.get("reason") or "not published")


def resume(folder: Path, campaign: Campaign, base: Any, tokenizer: Any, test: list,
           events: Events) -> tuple[dict[str, np.ndarray] | None, dict]:
    """(the last saved round's arrays, its state) of this very campaign, or (None, a round-0 state with the
    base model scored)."""
    print_id = fingerprint(campaign)
    resumed = checkpoint.load(folder / "checkpoint", print_id)
    if resumed:
        saved, state = resumed
        if state["curve"] and "best" not in state:  # a checkpoint from before best rounds were kept
            state["best"] = {"round": state["round"], "accuracy": state["curve"][-1]["accuracy"]}
        events("resumed", round=state["round"])
        return saved, state
    base_eval = exact_match(base, tokenizer, test)
    events("base_eval", accuracy=base_eval["accuracy"], n=base_eval["n"],
           precision=base_eval["base_precision"])
    state = {"round": 0, "fingerprint": print_id, "accuracy_base": base_eval["accuracy"], "curve": [],
             "ledger": {}, "eval_n": base_eval["n"], "base_precision": base_eval["base_precision"]}
    return None, state


def start_model(base: Any, campaign: Campaign, saved: dict[str, np.ndarray] | None,
                carry: rules.Carry) -> tuple[Any, dict[str, np.ndarray]]:
    """The base wrapped with the campaign's LoRA, holding the saved adapter (a fresh one without), and the
    adapter's tensors; what the rule carries is restored and folded in."""
    model = wrap(base, {**campaign.lora.__dict__})
    if saved is None:
        tensors = get_state(model)
    else:
        tensors = carry.restore(saved)
        set_state(model, tensors)
    carry.fold(model)
    return model, tensors


def aggregate_round(tensors: dict[str, np.ndarray], got: dict, plan: Any, rule: str, config: AggregateConfig,
                    carry: rules.Carry, step: outer.OuterConfig | None = None,
                    moments: dict[str, np.ndarray] | None = None,
                    ) -> tuple[dict[str, np.ndarray], AggregateReport, dict[str, np.ndarray]]:
    """The new global adapter: each key over the nodes whose shard covers it, then the outer optimizer's
    step from the old one (keys nobody's accepted update covered stay put); the carry takes in the rest.
    Returns it with the report and the outer optimizer's new state."""
    aggregated, report = aggregate_sharded(tensors, [u for u, _ in got.values()], plan, rule, config)
    carry.absorb(report)
    new, moments = outer.step(tensors, aggregated, moments or {}, step or outer.OuterConfig("none"),
                              report.unchanged)
    return new, report, moments


def evaluate(model: Any, tokenizer: Any, test: list, tensors: dict[str, np.ndarray],
             carry: rules.Carry) -> dict:
    """Held-out score of the model as the nodes averaged it: the adapter set, the carry folded in."""
    set_state(model, tensors)
    carry.fold(model)
    return exact_match(model, tokenizer, test)


def record(state: dict, round_: int, got: dict, evaluation: dict, report: AggregateReport,
           plan: Any) -> tuple[dict, bool]:
    """Add the round to `state` (ledger, curve, best round so far); (its curve point, whether it is best)."""
    metrics = {key: m for key, (_, m) in got.items()}
    accepted = set(report.accepted)
    update_ledger(state["ledger"], accepted, metrics)
    point = curve_point(round_, accepted, metrics, evaluation, report, plan)
    if report.dp:
        state["dp"] = report.dp
    state["curve"].append(point)
    state["round"] = round_
    state["eval_n"] = evaluation["n"]
    best = "best" not in state or evaluation["accuracy"] >= state["best"]["accuracy"]  # ties: more training
    if best:
        state["best"] = {"round": round_, "accuracy": evaluation["accuracy"],
                         "samples": evaluation["samples"]}
    return point, best


def load_publishable(folder: Path, state: dict, model: Any, tokenizer: Any, test: list,
                     tensors: dict[str, np.ndarray], carry: rules.Carry, events: Events) -> None:
    """Put the best round into `model`, as published: when the carry changes what is published (the exact
    rule re-projects its residual into the adapter's rank), that is scored too."""
    if "best" in state and state["best"]["round"] != state["round"]:  # publish the best round, not the last
        tensors = carry.restore(outer.split(checkpoint.load_best(folder / "checkpoint", state))[0])
        carry.fold(model)
        set_state(model, tensors)
    published = carry.published(model, tensors)
    if published is None:
        return
    set_state(model, published)
    scored = exact_match(model, tokenizer, test)
    state["accuracy_exact"] = state["best"]["accuracy"] if "best" in state else None
    state["accuracy_published"] = scored["accuracy"]
    events("projected", accuracy_exact=state["accuracy_exact"], accuracy_published=scored["accuracy"])


def finish(
    campaign: Campaign, home: Path, model: Any, state: dict, identity: Identity, events: Events,
    base_revision: str = "",
) -> dict:
    folder = home / "campaigns" / campaign.name
    best = state.get("best")
    final = best["accuracy"] if best else state["accuracy_base"]
    final = state.get("accuracy_published", final)  # the exact rule: score what is published
    result = {
        "name": campaign.name,
        "rounds": state["round"],
        "published_round": best["round"] if best else 0,
        "published_because": published_because(state) if best else "",
        "accuracy_base": state["accuracy_base"],
        "accuracy_adapter": final,
        "curve": state["curve"],
        "samples": best.get("samples", []) if best else [],
        "contributors": sorted(state["ledger"]),
        "ledger": list(state["ledger"].values()),
        "coordinator": identity.public_hex,
        "dp": state.get("dp"),
        "license": campaign.published_license(),
        "license_default": not campaign.license,
        "published": False,
    }
    if final < state["accuracy_base"] + campaign.publish_margin:
        result["reason"] = (
            f"adapter scored {final:.1%}, not above base {state['accuracy_base']:.1%} + margin "
            f"{campaign.publish_margin:.1%}: not published"
        )
        events("not_published", reason=result["reason"])
    else:
        card = {**result, "rounds": result["published_round"]}
        adapter_dir = write_adapter(model, folder / "adapter", campaign, card, len(result["contributors"]),
                                    base_revision)
        meta = AdapterMeta(
            name=campaign.name,  # version and previous: publish() takes them from this home's record
            base_model=campaign.base_model,
            base_revision=base_revision or campaign.base_revision,
            lora_config={**campaign.lora.__dict__},
            campaign=campaign.name,
            rounds=result["published_round"],
            contributors=result["contributors"],
            datasets=campaign.datasets,
            eval=manifest_eval(campaign, state, final, result),
            license=campaign.published_license(),
            ledger=result["ledger"],
        )
        # the ServerApp cannot open the index: `commons coordinator start` brought this home's record up to
        # it before the run (protocol.publishing.follow) and registers the adapter after it
        published = publish(adapter_dir, meta, None, identity=identity)
        cid, meta = published.cid, published.meta
        result.update(published=True, adapter_cid=cid, version=meta.version, adapter_dir=str(adapter_dir))
        events("published", name=campaign.name, cid=cid, version=meta.version,
               round=result["published_round"], because=result["published_because"], license=meta.license,
               license_default=result["license_default"])
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


def manifest_eval(campaign: Campaign, state: dict, final: float, result: dict) -> dict:
    """The manifest's `eval`: scores, the number actually scored, which round is published and why, and
    how many volunteers trained each layer against the campaign's min_coverage."""
    achieved = min((p["fewest_trainers"] for p in state["curve"] if "fewest_trainers" in p), default=0)
    coverage = {"min_coverage": campaign.min_coverage, "achieved": achieved}
    if achieved < campaign.min_coverage:
        coverage["note"] = coverage_shortfall(campaign, achieved)
    return {
        "metric": "exact_match",
        "accuracy_base": state["accuracy_base"],
        "accuracy_adapter": final,
        "n": state.get("eval_n", campaign.eval_size),
        "curve": state["curve"],
        "published_round": result["published_round"],
        "published_because": result["published_because"],
        "coverage": coverage,
        "task": campaign.task,
        "aggregation": campaign.aggregation,
        **({"base_precision": state["base_precision"]} if "base_precision" in state else {}),
        **({"accuracy_exact": state["accuracy_exact"]} if "accuracy_exact" in state else {}),
        **({"dp": state["dp"]} if state.get("dp") else {}),
    }

