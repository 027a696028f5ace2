"""Flower ServerApp: reads the campaign named in the run config and hands the Grid to the runner."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator import campaign as campaigns
from coordinator import runner

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = str(context.run_config.get("campaign", ""))
    home = Path(
        str(context.run_config.get("home") or os.environ.get("COMMONS_HOME") or Path.home() / ".commons")
    )
    os.environ["COMMONS_HOME"] = str(
        home
    )  # the trust store, block store and caches follow the campaign's home
    (home / "logs").mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=home / "logs" / "coordinator.log",
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
    )
    campaign = campaigns.load(Path(path))
    try:
        runner.run(grid, campaign, home)
    except Exception as exc:
        runner.Events(home / "campaigns" / campaign.name / "events.jsonl")(
            "error", message=str(exc).splitlines()[0][:500]
        )
        raise
