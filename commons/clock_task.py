"""A second generated task, beside the demo's dates: rewrite a time of day as 24-hour HH:MM.

Three families of styles, one per volunteer (non-IID, as in `demo_task`): times spelled out in words,
12-hour clocks with am/pm, and other 24-hour notations. The spelled and 12-hour families need the same
skill the third never shows (afternoon hours + 12), so what one volunteer learns is missing at another:
the case federated averaging has to get right. bench/bench_quality.py compares federated and centralized
training on it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

SYSTEM = "Answer with the time only."
PROMPT = "Write this time in 24-hour format as HH:MM: {}"
LICENSE = "CC0-1.0"
SOURCE = "lora-commons clock generator (synthetic)"

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty"}
Time = tuple[int, int]  # hour 0-23, minute 0-59


def words(n: int) -> str:
    """0-59 in English words: 7 "seven", 42 "forty-two"."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def _hour12(hour: int) -> int:
    return hour % 12 or 12


def _period(hour: int) -> str:
    """The part of the day a spoken time names: it decides am or pm."""
    if 5 <= hour < 12:
        return "in the morning"
    if 12 <= hour < 18:
        return "in the afternoon"
    if 18 <= hour < 22:
        return "in the evening"
    return "at night"


def _spoken(t: Time) -> str:
    """"seven forty-five in the evening", "three o'clock in the afternoon", "nine oh five at night"."""
    hour, minute = t
    clock = "o'clock" if minute == 0 else ("oh " + words(minute) if minute < 10 else words(minute))
    return f"{words(_hour12(hour))} {clock} {_period(hour)}"


def _past_to(t: Time) -> str:
    """"a quarter past three in the afternoon", "twenty minutes to nine in the evening"."""
    hour, minute = t
    if minute <= 30:
        named = {0: "", 15: "a quarter past", 30: "half past"}.get(minute, f"{words(minute)} minutes past")
        return f"{named} {words(_hour12(hour))} {_period(hour)}".strip()
    named = "a quarter to" if minute == 45 else f"{words(60 - minute)} minutes to"
    return f"{named} {words(_hour12(hour + 1))} {_period(hour)}"


def _ampm(t: Time, am: str, pm: str, fmt: str) -> str:
    hour, minute = t
    return fmt.format(h=_hour12(hour), m=minute, p=am if hour < 12 else pm)


# Three families of styles, one per volunteer in a non-IID split.
STYLES: dict[str, list[Callable[[Time], str]]] = {
    "spelled": [_spoken, _past_to],
    "twelve-hour": [
        lambda t: _ampm(t, "AM", "PM", "{h}:{m:02d} {p}"),
        lambda t: _ampm(t, "a.m.", "p.m.", "{h}.{m:02d} {p}"),
        lambda t: _ampm(t, "am", "pm", "{h:02d}:{m:02d}{p}"),
    ],
    "twenty-four": [
        lambda t: f"{t[0]}h{t[1]:02d}",
        lambda t: f"{t[0]:02d}{t[1]:02d} hours",
        lambda t: f"{t[0]:02d}:{t[1]:02d}:00",
    ],
}


def record(t: Time, style: Callable[[Time], str]) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROMPT.format(style(t))},
            {"role": "assistant", "content": f"{t[0]:02d}:{t[1]:02d}"},
        ],
        "license": LICENSE,
        "source": SOURCE,
    }


def make_records(n: int, families: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    styles = [style for family in families for style in STYLES[family]]
    return [record((rng.randrange(24), rng.randrange(60)), rng.choice(styles)) for _ in range(n)]
