"""Where state lives: everything under $COMMONS_HOME (default ~/.commons)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    root = Path(os.environ.get("COMMONS_HOME") or Path.home() / ".commons").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sub(*parts: str) -> Path:
    """A folder under the home, created on first use."""
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
