"""The coordinator's Flower ServerApp: a campaign that fails to load still ends its events with an error, so
`commons coordinator start` and `commons demo` stop and say why instead of waiting for events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from coordinator import server_app
from protocol.errors import CommonsError


def test_a_campaign_the_serverapp_cannot_load_ends_its_events_with_the_reason(tmp_path: Path) -> None:
    campaign = tmp_path / "c.toml"
    campaign.write_text('name = "broken"\nbase_model = "tiny"\neval_file = "missing.jsonl"\n')
    context = Context(1, 0, {}, RecordDict(), {"campaign": str(campaign), "home": str(tmp_path / "home")})
    with pytest.raises(CommonsError):
        server_app.main(None, context)
    events = (tmp_path / "home" / "campaigns" / "broken" / "events.jsonl").read_text().splitlines()
    last = json.loads(events[-1])
    assert last["event"] == "error" and "missing.jsonl" in last["message"]
