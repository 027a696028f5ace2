"""What every detector returns, and the small helpers they share."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def cued(text: str, start: int, cue: re.Pattern[str], window: int = 40) -> bool:
    """Whether `cue` occurs in the `window` characters before `start`, on the same line."""
    before = text[max(0, start - window):start]
    return cue.search(before.rsplit("\n", 1)[-1]) is not None
