"""How every reporting command prints: one JSON object with --json, else text for people.

    >>> emit(as_json, {"cid": cid, "size": size}, cid)             # text: the CID alone on stdout
    >>> emit(as_json, report, lambda: show(report))                # text: whatever show() prints
    >>> say(as_json, "seeding for 120s", err=True)                 # text only: --json keeps stdout clean
    >>> warn_unreached(node.bootstrap_errors)                       # stderr: peers a libp2p host missed

Under --json stdout carries nothing but that object, so scripts can `json.loads` it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click


def emit(as_json: bool, data: Any, text: str | Callable[[], object] | None, *,
         sort_keys: bool = False) -> None:
    """`data` as one JSON line with --json; else `text`: a string for stdout, a function that prints it
    (several lines, some on stderr), or None for nothing."""
    if as_json:
        click.echo(json.dumps(data, sort_keys=sort_keys))
    elif callable(text):
        text()
    elif text is not None:
        click.echo(text)


def say(as_json: bool, text: str, err: bool = False) -> None:
    """A line for people only: silent with --json."""
    if not as_json:
        click.echo(text, err=err)


def warn_unreached(bootstrap_errors: dict[str, str], relay_errors: dict[str, str] | None = None) -> None:
    """One stderr line per libp2p peer a host could not reach at start (it keeps running without them)."""
    for addr, why in bootstrap_errors.items():
        click.echo(f"warning: bootstrap peer {addr} unreachable: {why}", err=True)
    for addr, why in (relay_errors or {}).items():
        click.echo(f"warning: no reservation at relay {addr} (retrying): {why}", err=True)
