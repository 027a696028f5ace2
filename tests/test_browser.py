"""The index in a real headless Chromium, served by uvicorn on a loopback port."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from index.app import create_app
from index.db import IndexDB
from index.sample import make_entry, sample_meta
from protocol.content.blockstore import BlockStore
from protocol.signing.keys import Identity

pytestmark = pytest.mark.browser
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS_NAME_TEXT = '<img src=x onerror="alert(document.domain)"><script>alert(1)</script>'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn

    root = tmp_path_factory.mktemp("browser")
    store, db, me = (BlockStore(root / "blocks"), IndexDB(f"sqlite:///{root / 'index.db'}"),
                     Identity.generate())
    entries = [
        ("gsm8k-smollm2", {"eval": {"task": "gsm8k", "description": "grade-school maths",
                                    "accuracy_base": 0.2, "accuracy_adapter": 0.35,
                                    "curve": [{"round": r, "loss": 2 - r / 3, "accuracy": 0.2 + r / 20}
                                              for r in range(4)]}}),
        ("python-coder", {"license": "MIT", "campaign": "code", "eval": {"task": "code"}}),
        ("qwen-helper", {"base_model": "Qwen/Qwen2.5-0.5B", "campaign": "chat", "eval": {"task": "chat"}}),
        ("xss-adapter", {"campaign": XSS_NAME_TEXT, "eval": {"task": "xss", "description": XSS_NAME_TEXT}}),
    ]
    for i, (name, fields) in enumerate(entries):
        db.register(*make_entry(root / f"e{i}", sample_meta(name, **fields), me, store))
    port = _free_port()
    config = uvicorn.Config(create_app(db, store), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        pg = browser.new_page()
        dialogs: list[str] = []
        pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        pg.dialogs = dialogs  # type: ignore[attr-defined]
        yield pg
        browser.close()


def test_search_and_filters(page: object, server: str) -> None:
    page.goto(server + "/")  # type: ignore[attr-defined]
    rows = page.locator("#results tr.entry a.name")  # type: ignore[attr-defined]
    assert sorted(rows.all_inner_texts()) == ["gsm8k-smollm2", "python-coder", "qwen-helper", "xss-adapter"]
    page.fill("#q", "python")  # type: ignore[attr-defined]
    page.click("form.search button")  # type: ignore[attr-defined]
    page.wait_for_url("**q=python**")  # type: ignore[attr-defined]
    assert rows.all_inner_texts() == ["python-coder"]
    page.goto(server + "/")  # type: ignore[attr-defined]
    page.select_option("#base_model", "Qwen/Qwen2.5-0.5B")  # type: ignore[attr-defined]
    page.click("form.search button")  # type: ignore[attr-defined]
    page.wait_for_url("**base_model=**")  # type: ignore[attr-defined]
    assert rows.all_inner_texts() == ["qwen-helper"]
    page.select_option("#base_model", "")  # type: ignore[attr-defined]
    page.select_option("#license", "MIT")  # type: ignore[attr-defined]
    page.click("form.search button")  # type: ignore[attr-defined]
    page.wait_for_url("**license=MIT**")  # type: ignore[attr-defined]
    assert rows.all_inner_texts() == ["python-coder"]
    page.fill("#q", "no-such-thing")  # type: ignore[attr-defined]
    page.click("form.search button")  # type: ignore[attr-defined]
    page.wait_for_url("**q=no-such-thing**")  # type: ignore[attr-defined]
    assert page.locator("#no-results").is_visible()  # type: ignore[attr-defined]


def test_adapter_page_shows_badge_plot_and_pull_command(page: object, server: str) -> None:
    page.goto(server + "/?q=gsm8k")  # type: ignore[attr-defined]
    page.click("text=gsm8k-smollm2")  # type: ignore[attr-defined]
    page.wait_for_url("**/adapters/gsm8k-smollm2")  # type: ignore[attr-defined]
    badge = page.locator("#signature-badge")  # type: ignore[attr-defined]
    assert badge.is_visible() and "verified" in badge.inner_text()
    assert len(page.locator("#signer").inner_text()) == 64  # type: ignore[attr-defined]
    plot = page.locator("#curve svg")  # type: ignore[attr-defined]
    assert plot.is_visible()
    box = plot.bounding_box()
    assert box["width"] > 200 and box["height"] > 100
    assert page.locator("#curve polyline").count() == 2  # type: ignore[attr-defined]
    assert page.locator("#pull-command").inner_text().strip() == "commons pull gsm8k-smollm2"  # type: ignore[attr-defined]
    assert "load_adapter" in page.locator("#python-snippet").inner_text()  # type: ignore[attr-defined]
    assert page.locator("#files tbody tr").count() == 2  # type: ignore[attr-defined]


def test_xss_payload_renders_inert(page: object, server: str) -> None:
    page.goto(server + "/adapters/xss-adapter")  # type: ignore[attr-defined]
    page.wait_for_load_state("load")  # type: ignore[attr-defined]
    page.wait_for_timeout(300)  # type: ignore[attr-defined]  # give an injected onerror time to fire
    assert page.dialogs == []  # type: ignore[attr-defined]
    assert page.locator("#description").inner_text() == XSS_NAME_TEXT  # type: ignore[attr-defined]
    assert page.locator("main img").count() == 0 and page.locator("main script").count() == 0  # type: ignore[attr-defined]
    page.goto(server + "/?q=xss")  # type: ignore[attr-defined]
    page.wait_for_timeout(300)  # type: ignore[attr-defined]
    assert page.dialogs == []  # type: ignore[attr-defined]
    assert XSS_NAME_TEXT in page.locator("#results").inner_text()  # type: ignore[attr-defined]


def test_api_is_reachable_from_the_browser(page: object, server: str) -> None:
    page.goto(server + "/api/resolve/python-coder")  # type: ignore[attr-defined]
    body = json.loads(page.locator("body").inner_text())  # type: ignore[attr-defined]
    assert body["name"] == "python-coder" and body["cid"].startswith("Qm")
