"""Server-rendered pages (Jinja2 with autoescape on: every value from a manifest is escaped)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from index.db import IndexDB
from index.present import MAX_VERSION, PRICE_PER_1K_TOKENS, curve_svg, detail, human_size, pull_command
from protocol.errors import CommonsError

TEMPLATES = Path(__file__).parent / "templates"
# Size filter choices on the list page: label → max bytes.
SIZES = {"": None, "10mb": 10 * 2**20, "100mb": 100 * 2**20, "1gb": 2**30}


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    env = templates.env
    env.autoescape = True  # belt and braces: Starlette enables it for .html, we want it for every template
    env.filters["size"] = human_size
    env.filters["short"] = lambda key: (str(key)[:16] + "…") if len(str(key)) > 16 else str(key)
    env.filters["usd"] = lambda v: f"${v:,.2f}"
    env.filters["pct"] = lambda v: f"{float(v) * 100:.1f}%" if isinstance(v, int | float) else "–"
    env.filters["plural"] = plural
    env.globals["price_per_1k"] = PRICE_PER_1K_TOKENS
    return templates


def plural(count: object, word: str, with_count: bool = True) -> str:
    """`1|plural("adapter")` is "1 adapter", `2|plural("adapter")` "2 adapters";
    the word alone without the count."""
    noun = word if count == 1 else f"{word}s"
    return f"{count} {noun}" if with_count else noun


def _bool(value: str) -> bool | None:
    return {"1": True, "true": True, "0": False, "false": False}.get(value.lower())


def make_router(db: IndexDB) -> APIRouter:
    pages = APIRouter(include_in_schema=False)
    templates = make_templates()

    def render(request: Request, name: str, status: int = 200, **ctx: object) -> HTMLResponse:
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    def not_found(request: Request, message: str) -> HTMLResponse:
        return render(request, "notfound.html", 404, message=message)

    @pages.get("/", response_class=HTMLResponse, name="home")
    def home(request: Request, q: str = Query("", max_length=200), base_model: str = "", task: str = "",
             license: str = "", trusted: str = "", size: str = "") -> HTMLResponse:
        found = db.search(q, base_model=base_model or None, license=license or None, task=task or None,
                          trusted=_bool(trusted), max_size=SIZES.get(size), limit=100)
        form = {"q": q, "base_model": base_model, "task": task, "license": license, "trusted": trusted,
                "size": size}
        return render(request, "index.html", entries=found, form=form, facets=db.facets(),
                      sizes=list(SIZES), stats=db.stats())

    @pages.get("/adapters/{name}", response_class=HTMLResponse, name="adapter_page")
    def adapter_page(request: Request, name: str,
                     version: int | None = Query(None, ge=1, le=MAX_VERSION)) -> HTMLResponse:
        try:
            entry = detail(db, db.resolve(name, version))
        except CommonsError as exc:
            return not_found(request, str(exc))
        meta = entry["meta"]
        ev = meta.get("eval") if isinstance(meta.get("eval"), dict) else {}
        template = "dataset.html" if entry["kind"] == "dataset" else "adapter.html"
        return render(request, template, e=entry, meta=meta, ev=ev, curve=curve_svg(ev.get("curve")),
                      pull=pull_command(entry["name"]))

    @pages.get("/datasets", response_class=HTMLResponse, name="datasets_page")
    def datasets_page(request: Request, q: str = Query("", max_length=200),
                      license: str = "") -> HTMLResponse:
        found = db.search(q, license=license or None, kind="dataset", limit=100)
        return render(request, "datasets.html", entries=found, form={"q": q, "license": license},
                      licenses=db.facets("dataset")["license"])

    @pages.get("/datasets/{name}", response_class=HTMLResponse, name="dataset_page")
    def dataset_page(request: Request, name: str,
                     version: int | None = Query(None, ge=1, le=MAX_VERSION)) -> HTMLResponse:
        return adapter_page(request, name, version)

    @pages.get("/leaderboard", response_class=HTMLResponse, name="leaderboard_page")
    def leaderboard_page(request: Request) -> HTMLResponse:
        return render(request, "leaderboard.html", rows=db.leaderboard(200))

    @pages.get("/stats", response_class=HTMLResponse, name="stats_page")
    def stats_page(request: Request) -> HTMLResponse:
        s = db.stats()
        return render(request, "stats.html", s=s, cost=s["tokens"] / 1000 * PRICE_PER_1K_TOKENS)

    return pages
