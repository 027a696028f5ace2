"""Flower ServerApp: reads the campaign named in the run config and hands the Grid to the runner."""

from __future__ import annotations

import logging
import os
import tomllib
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
    name = _name_in(Path(path))
    try:
        campaign = campaigns.load(Path(path))
        runner.run(grid, campaign, home)
    except Exception as exc:
        # whoever follows the events (`coordinator start`, `demo`) stops on this line instead of waiting
        if name:
            runner.Events(home / "campaigns" / name / "events.jsonl")(
                "error", message=str(exc).splitlines()[0][:500]
            )
        raise


def _name_in(path: Path) -> str | None:
    """The campaign's name, read even when the rest of the file would not load."""
    try:
        name = tomllib.loads(path.read_text()).get("name")
    except (OSError, ValueError):
        return None
    return name if isinstance(name, str) and name else None
