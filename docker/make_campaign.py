"""Write docker/campaign/: the campaign the compose network runs, made by the demo's own generator.

    .venv/bin/python docker/make_campaign.py

The result is the same task as `commons demo` (dates to ISO 8601 on SmolLM2-135M), laid out for
containers. campaign.toml and test.jsonl are for the coordinator. node0.jsonl, node1.jsonl and
node2.jsonl are each volunteer's own non-IID slice (node2 is the GPU volunteer's).
"""

from __future__ import annotations

import sys
from pathlib import Path

from commons.demo import campaign_for
from commons.demo_task import write_demo_data
from coordinator.campaign import dump
from modeling.load import SMOLLM2_ID

OUT = Path(__file__).with_name("campaign")
SHARDS = 3  # volunteer-1, volunteer-2, volunteer-gpu
MIN_NODES = 2  # the two CPU volunteers; the GPU one joins when its profile is up
ROUNDS = 3
STEPS = 8
PER_NODE = 200
EVAL_SIZE = 48


def main() -> None:
    data = write_demo_data(OUT, SHARDS, PER_NODE, EVAL_SIZE)
    # A relative eval_file: the campaign loader resolves it next to campaign.toml, wherever it is mounted.
    # No [[datasets]]: each volunteer trains on its own file (data = "local"), which nobody publishes.
    campaign = campaign_for("dates-iso-smollm2", SMOLLM2_ID, Path(data["test"].name), MIN_NODES, ROUNDS,
                            STEPS, EVAL_SIZE, datasets=[],
                            # two trusted volunteers (three with the GPU one): nobody to out-vote, so
                            # plain FedAvg, and 2 trainers per layer so the shards show
                            aggregation="fedavg", min_coverage=2)
    (OUT / "campaign.toml").write_text(dump(campaign))
    print(f"wrote {OUT}: campaign.toml, {data['test'].name}, {', '.join(p.name for p in data['train'])}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
