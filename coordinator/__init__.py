"""The coordinator role: runs a campaign over Flower, aggregates volunteers' updates, publishes the adapter.

Its parts:

    server_app.py   the Flower ServerApp: reads the campaign file, hands the Grid to the runner.
    runner.py       a campaign's loop: query, plan, train, aggregate, evaluate, checkpoint; then publish.
    rounds.py       one round on the Grid: ask nodes what they can do, send each its keys, verify replies.
    plan.py         the shard plan: which layers each node trains, so every layer is trained every round.
    rules/          aggregation rules, one file each, listed in `rules.RULES` (fedavg, exact, robust);
                    `rules.sharded.aggregate_sharded` runs one per key group of a plan.
    privacy.py      central DP: the Gaussian mechanism and its accountant.
    campaign.py     the campaign file (TOML). checkpoint.py, restart.py: resume after a crash or refuse.
    evaluate.py     exact-match scoring. publish.py: the signed PEFT folder. closed.py, gate.py: who may join.

The main path: server_app → runner → rounds → plan → rules.
"""
