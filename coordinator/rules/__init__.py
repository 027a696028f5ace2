"""Aggregation rules: how the coordinator turns a round's verified updates into the next global adapter.

    >>> new, report = aggregate(global_tensors, updates)                # "robust", the default
    >>> new, report = aggregate(global_tensors, updates, "exact")       # + report.residuals
    >>> new, report = sharded.aggregate_sharded(global_tensors, updates, plan)   # per key group of a plan
    >>> carry = create(campaign.aggregation, config).carry(scaling)     # what a rule keeps across rounds

A rule is a `Rule` subclass: the shared pipeline (reject what is malformed, weigh, clip, select,
average, add DP noise) with the hooks its variant overrides; an instance holds its `AggregateConfig`.
`rule.carry(scaling)`, made once per campaign, is what the rule keeps across rounds besides the adapter
(the exact rule's full-rank residual; nothing for the others) and how it is checkpointed.

    toolkit.py      updates, settings, the report, the LoRA key structure, the arithmetic.
    base.py         `Rule` (the pipeline and its hooks) and `Carry`.
    fedavg.py  exact.py  robust.py     one file per rule, listed in RULES below.
    trimmed_mean.py  median.py  krum.py    how robust judges updates, over views.py; in robust.COMBINES.
    sharded.py      one rule call per key group of a shard plan (import it from there: it needs
                    `coordinator.plan`, which needs this package).

A new rule is a new file with a `Rule` subclass plus one line in RULES. Central DP (`config.dp`) is
described in `coordinator.privacy`; a rule that keeps a residual refuses it.
"""

from __future__ import annotations

from coordinator.rules.base import Carry, Rule
from coordinator.rules.exact import Exact
from coordinator.rules.fedavg import FedAvg
from coordinator.rules.robust import COMBINES, Robust
from coordinator.rules.toolkit import AggregateConfig, AggregateReport, Tensors, Update
from protocol.errors import CommonsError

RULES: dict[str, type[Rule]] = {
    "fedavg": FedAvg,
    "exact": Exact,
    "robust": Robust,
}

__all__ = [
    "COMBINES", "RULES", "AggregateConfig", "AggregateReport", "Carry", "Rule", "Tensors", "Update",
    "aggregate", "create", "get",
]


def get(name: str) -> type[Rule]:
    """The rule registered as `name`. Raises CommonsError listing the choices when there is none."""
    if name not in RULES:
        raise CommonsError(f"unknown aggregation rule {name!r}; use one of {', '.join(RULES)}")
    return RULES[name]


def create(name: str, config: AggregateConfig | None = None) -> Rule:
    """Rule `name` with `config`. Raises CommonsError for an unknown rule or combine, or a bad setting."""
    rule = get(name)
    config = config or AggregateConfig()
    if config.combine not in COMBINES:
        raise CommonsError(f"unknown robust combine {config.combine!r}; use one of {', '.join(COMBINES)}")
    return rule(config)


def aggregate(
    global_tensors: Tensors,
    updates: list[Update],
    rule: str = "robust",
    config: AggregateConfig | None = None,
) -> tuple[Tensors, AggregateReport]:
    """New global tensors (fresh arrays) and a report of who was accepted, rejected and clipped."""
    return create(rule, config).aggregate(global_tensors, updates)
