"""The records a node trains on this round: its own local file, or its slice of the campaign's datasets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.records import read_records

if TYPE_CHECKING:
    from node.worker import NodeSettings


def training_records(settings: NodeSettings, config: dict) -> list[dict]:
    return read_records(settings.data)
