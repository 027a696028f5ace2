"""The coordinator role: runs a campaign over Flower, aggregates volunteers' updates, publishes the adapter.

Its parts:

    server_app.py   the Flower ServerApp: reads the campaign file, hands the Grid to the runner.
    runner.py       a campaign's loop: query, plan, train, aggregate, evaluate, checkpoint; then publish.
    rounds.py       one round on the Grid: plan, send each node its keys, verify replies, close on time.
    roster.py       who is there: messages with deadlines, what each node said it is, who keeps deadlines.
    plan.py         the shard plan: which layers each node trains, so every layer is trained every round.
    rules/          aggregation rules, one file each, listed in `rules.RULES` (fedavg, exact, robust);
                    `rules.sharded.aggregate_sharded` runs one per key group of a plan.
    outer.py        the outer optimizer: a round's aggregate taken as a step (Nesterov momentum, Adam).
    privacy.py      central DP: the Gaussian mechanism and its accountant.
    campaign.py     the campaign file (TOML). checkpoint.py, restart.py: resume after a crash or refuse.
    evaluate.py     exact-match scoring. publish.py: the signed PEFT folder. closed.py, gate.py: who may join.

The main path: server_app → runner → rounds (→ roster) → plan → rules.
"""
