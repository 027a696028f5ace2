"""What the pages and the API both show: an entry's summary and detail, sizes, costs, the training-curve SVG.

    >>> detail(db, db.resolve("smollm2-math"))     # the API's /api/adapters/NAME and the adapter page alike
"""

from __future__ import annotations

import math

from markupsafe import Markup

from index.db import IndexDB
from index.licenses import conflicts
from index.schema import nonneg

PRICE_PER_1K_TOKENS = 0.008  # USD, a commercial fine-tuning API's training price
MAX_VERSION = 2**53 - 1  # what a manifest may carry (protocol.signing.manifest)


def summary(entry: dict) -> dict:
    """An entry as search results list it, with the command that pulls it."""
    return {**entry, "pull": pull_command(entry["name"])}


def detail(db: IndexDB, entry: dict) -> dict:
    """An entry with its files, every version of its name, its training cost and licence warnings."""
    meta = entry["meta"]
    files = [{"path": str(f.get("path") or f.get("name") or ""), "size": int(f.get("size", 0) or 0),
              "sha256": str(f.get("sha256", "")), "cid": str(f.get("cid", ""))} for f in entry["files"]]
    return {**summary(entry), "files": files, "versions": db.versions(entry["name"]),
            "cost_usd": cost_usd(meta.get("ledger")),
            "license_warnings": conflicts(entry["license"], meta.get("datasets") or [])}


def cost_usd(ledger: list[dict] | None) -> float:
    """What the ledger's training tokens would cost on a commercial fine-tuning API."""
    tokens = sum(nonneg(item.get("tokens")) for item in ledger or [] if isinstance(item, dict))
    return round(tokens / 1000 * PRICE_PER_1K_TOKENS, 2)


def human_size(n: float) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def pull_command(name: str) -> str:
    return f"commons pull {name}"


def _num(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def curve_points(curve: list[dict] | None) -> list[tuple[float, float | None, float | None]]:
    """(round, loss, accuracy) for every entry with a numeric round, in round order."""
    points = []
    for item in curve or []:
        if isinstance(item, dict) and (r := _num(item.get("round"))) is not None:
            points.append((r, _num(item.get("loss")), _num(item.get("accuracy"))))
    return sorted(points)


def curve_svg(curve: list[dict] | None, width: int = 560, height: int = 220) -> Markup:
    """Loss (left axis) and accuracy (right axis) per round as inline SVG; only numbers reach the markup."""
    points = curve_points(curve)
    if not points:
        return Markup("")
    left, right, top, bottom = 48, 48, 28, 32
    w, h = width - left - right, height - top - bottom
    r0, r1 = points[0][0], points[-1][0]
    losses = [p[1] for p in points if p[1] is not None]
    lmax = max(losses, default=1.0) or 1.0
    amax = max(1.0, max((p[2] for p in points if p[2] is not None), default=1.0))

    def x(r: float) -> float:
        return left + (w * (r - r0) / (r1 - r0) if r1 > r0 else w / 2)

    def series(idx: int, vmax: float, cls: str) -> str:
        pts = [(x(p[0]), top + h - h * (p[idx] / vmax)) for p in points if p[idx] is not None]
        if not pts:
            return ""
        line = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        dots = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" class="{cls}"/>' for a, b in pts)
        return f'<polyline points="{line}" class="{cls}" fill="none"/>{dots}'

    ticks = "".join(
        f'<text x="{x(p[0]):.1f}" y="{height - 12}" text-anchor="middle" class="tick">{p[0]:g}</text>'
        for p in points[:: max(1, len(points) // 10)]
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="curve" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>training curve: loss and accuracy per round</title>'
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="frame" fill="none"/>'
        f'{series(1, lmax, "loss")}{series(2, amax, "accuracy")}{ticks}'
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end" class="tick">{lmax:.3g}</text>'
        f'<text x="{left - 6}" y="{top + h}" text-anchor="end" class="tick">0</text>'
        f'<text x="{left + w + 6}" y="{top + 10}" class="tick">{amax:.3g}</text>'
        f'<text x="{left + w / 2:.1f}" y="{height - 1}" text-anchor="middle" class="tick">round</text>'
        f'<text x="{left}" y="14" class="loss legend">— loss (left axis)</text>'
        f'<text x="{left + w}" y="14" text-anchor="end" class="accuracy legend">accuracy (right axis) '
        '—</text></svg>'
    )
    return Markup(svg)
