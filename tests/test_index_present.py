"""Pure helpers behind the pages: licence conflicts, cost, the curve SVG, the write token bucket."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from index.licenses import conflicts
from index.present import cost_usd, curve_points, curve_svg, human_size
from index.ratelimit import TokenBucket


def test_licence_conflicts() -> None:
    nc = [{"name": "chats", "license": "CC-BY-NC-4.0"}]
    assert conflicts("Apache-2.0", nc) == [
        ("dataset chats is CC-BY-NC-4.0 (non-commercial) but the adapter is Apache-2.0, which allows "
         "commercial use")]
    assert conflicts("CC-BY-NC-4.0", nc) == []
    assert "no derivatives" in conflicts("CC-BY-NC-ND-4.0", [{"name": "d", "license": "CC-BY-ND-4.0"}])[0]
    assert "share-alike" in conflicts("MIT", [{"name": "wiki", "license": "CC-BY-SA-4.0"}])[0]
    assert conflicts("CC-BY-SA-4.0", [{"name": "wiki", "license": "CC-BY-SA-4.0"}]) == []
    assert "declares no licence" in conflicts("MIT", [{"name": "x"}])[0]
    assert conflicts("MIT", [{"name": "gsm8k", "license": "MIT"}, {"name": "c", "license": "CC0-1.0"}]) == []


def test_cost_and_sizes() -> None:
    assert cost_usd([{"tokens": 600_000}, {"tokens": 400_000}]) == 8.0  # $0.008 per 1K tokens
    assert cost_usd([]) == 0.0 and cost_usd([{"tokens": "junk"}]) == 0.0
    assert human_size(512) == "512 B" and human_size(3 * 2**20) == "3.0 MiB"


def test_curve_svg_is_valid_svg_built_from_numbers_only() -> None:
    curve = [{"round": 2, "loss": 1.0, "accuracy": 0.5}, {"round": 0, "loss": 2.0, "accuracy": 0.25},
             {"round": "x"}, {"round": 1, "loss": float("nan"), "accuracy": "<b>"}, "junk"]
    assert curve_points(curve) == [(0.0, 2.0, 0.25), (1.0, None, None), (2.0, 1.0, 0.5)]
    svg = str(curve_svg(curve))
    root = ET.fromstring(svg)
    polylines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert [p.get("class") for p in polylines] == ["loss", "accuracy"]
    assert len(polylines[0].get("points").split()) == 2  # round 1 had no usable loss
    assert "<b>" not in svg and "nan" not in svg.lower()
    assert str(curve_svg([])) == "" and str(curve_svg(None)) == ""


def test_token_bucket_refills_over_time() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert [bucket.take("a") for _ in range(2)] == [0.0, 0.0]
    assert bucket.take("a") == 0.5  # one token arrives in half a second
    assert bucket.take("b") == 0.0  # other addresses have their own bucket
    now[0] += 0.5
    assert bucket.take("a") == 0.0
    small = TokenBucket(rate=1.0, burst=1, max_keys=2, clock=lambda: now[0])
    for key in "xyz":
        small.take(key)
    assert small.take("x") == 0.0  # the oldest address was forgotten, not kept forever
