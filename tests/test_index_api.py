"""The index over HTTP (FastAPI TestClient): announce rules, JSON API, pages, gateway, limits."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from index.app import create_app
from index.db import IndexDB
from index.sample import make_entry, sample_meta
from protocol.content.blockstore import BlockStore
from protocol.content.car import read_car
from protocol.signing.bundle import payload_of, sign_bundle
from protocol.signing.keys import Identity
from protocol.signing.manifest import SIGNATURE_FILE

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class Env:
    def __init__(self, root: Path, **app_kw: object) -> None:
        self.root, self.me, self.n = root, Identity.generate(), 0
        self.store = BlockStore(root / "blocks")
        self.db = IndexDB(f"sqlite:///{root / 'index.db'}")
        self.client = TestClient(create_app(self.db, self.store, **app_kw))

    def make(self, name: str, version: int = 1, store: bool = True, **fields: object) -> tuple[bytes, str]:
        self.n += 1
        return make_entry(self.root / f"e{self.n}", sample_meta(name, version, **fields), self.me,
                          self.store if store else None)

    def announce(self, envelope: object, cid: str) -> object:
        return self.client.post("/api/announce", json={"envelope": envelope, "cid": cid})


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _one_line(response: object) -> str:
    detail = response.json()["detail"]  # type: ignore[attr-defined]
    assert isinstance(detail, str) and "\n" not in detail and detail
    return detail


def test_announce_in_every_envelope_encoding_then_resolve(env: Env) -> None:
    env1, cid1 = env.make("gsm8k-smollm2")
    r = env.announce(json.loads(env1), cid1)  # JSON object
    assert r.status_code == 201, r.text
    assert r.json()["url"].endswith("/adapters/gsm8k-smollm2")
    assert env.announce(base64.b64encode(env1).decode(), cid1).status_code == 201  # same again: idempotent
    env2, cid2 = env.make("gsm8k-smollm2", 2, previous=cid1)
    assert env.announce(env2.decode(), cid2).status_code == 201  # JSON text
    got = env.client.get("/api/resolve/gsm8k-smollm2").json()
    assert (got["cid"], got["version"], got["signer"]) == (cid2, 2, env.me.public_hex)
    assert env.client.get("/api/resolve/gsm8k-smollm2@1").json()["cid"] == cid1
    assert env.client.get("/api/resolve/gsm8k-smollm2@v1").json()["cid"] == cid1
    assert {f["path"] for f in got["files"]} == {"adapter_config.json", "adapter_model.safetensors"}


def test_announce_refusals_are_clear_one_line_4xx(env: Env) -> None:
    good, cid = env.make("target")
    doc = json.loads(good)
    unsigned = {**doc, "dsseEnvelope": {**doc["dsseEnvelope"], "signatures": []}}
    r = env.announce(unsigned, cid)
    assert r.status_code == 403 and "signature" in _one_line(r).lower()
    forged = sign_bundle(payload_of(doc), Identity.generate())  # another key signs the same statement
    r = env.announce(forged, cid)
    assert r.status_code == 403, r.text
    _one_line(r)
    assert env.announce(doc, cid).status_code == 201
    replay, replay_cid = env.make("target", 1, eval={"accuracy_adapter": 1.0})
    r = env.announce(json.loads(replay), replay_cid)
    assert r.status_code == 409 and "replay refused" in _one_line(r)
    for body, status in [({"envelope": "%%% not base64", "cid": cid}, 400),
                         ({"envelope": base64.b64encode(b"hello").decode(), "cid": cid}, 400),
                         ({"envelope": doc, "cid": "not-a-cid"}, 400),
                         ({"envelope": doc}, 422), ({"cid": cid}, 422), ([1, 2], 422)]:
        r = env.client.post("/api/announce", json=body)
        assert r.status_code == status, (body, r.text)
        _one_line(r)
    r = env.client.post("/api/announce", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and _one_line(r)
    assert env.client.get("/api/resolve/target").json()["cid"] == cid


def test_announce_refuses_a_cid_whose_stored_manifest_differs(env: Env, tmp_path: Path) -> None:
    real, real_cid = env.make("honest")
    other_env, _ = env.make("other")
    r = env.announce(json.loads(other_env), real_cid)  # someone else's envelope pointed at our directory
    assert r.status_code == 403 and SIGNATURE_FILE in _one_line(r)
    assert env.announce(json.loads(real), real_cid).status_code == 201


def test_api_search_filters_stats_leaderboard_and_openapi(env: Env) -> None:
    mismatch = env.announce(json.loads(env.make("math-a", eval={"task": "gsm8k"})[0]), env.make("x")[1])
    assert mismatch.status_code == 403
    for name, fields in [("math-a", {"eval": {"task": "gsm8k"}}),
                         ("coder", {"license": "MIT", "campaign": "code"}),
                         ("qwen-chat", {"base_model": "Qwen/Qwen2.5-0.5B", "campaign": "chat"})]:
        e, c = env.make(name, **fields)
        assert env.announce(json.loads(e), c).status_code == 201
    api = env.client.get
    assert [a["name"] for a in api("/api/adapters?q=math").json()] == ["math-a"]
    assert [a["name"] for a in api("/api/adapters?license=MIT").json()] == ["coder"]
    assert [a["name"] for a in api("/api/adapters?base_model=Qwen/Qwen2.5-0.5B").json()] == ["qwen-chat"]
    assert api("/api/adapters?q=math").json()[0]["pull"] == "commons pull math-a"
    detail = api("/api/adapters/math-a").json()
    assert detail["cost_usd"] == 4.8 and detail["license_warnings"] == []
    assert api("/api/adapters/nope").status_code == 404
    assert api("/api/resolve/nope@x").status_code == 400
    stats = api("/api/stats").json()
    assert stats["adapters"] == 3 and stats["tokens"] == 1_800_000 and stats["cost_usd"] == 14.4
    assert api("/api/leaderboard").json()[0] == {"node": "aa" * 32, "rounds": 9, "tokens": 1_080_000,
                                                  "adapters": 3}
    assert api("/api/datasets").json() == []
    paths = api("/openapi.json").json()["paths"]
    assert {"/api/adapters", "/api/resolve/{ref}", "/api/announce", "/ipfs/{cid}"} <= set(paths)
    assert api("/docs").status_code == 200


def test_gateway_serves_verifiable_blocks_and_cars(env: Env) -> None:
    _, cid = env.make("blocks")
    r = env.client.get(f"/ipfs/{cid}?format=raw")
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.ipld.raw"
    assert r.content == env.store.get(cid)
    r = env.client.get(f"/ipfs/{cid}", headers={"accept": "application/vnd.ipld.raw"})
    assert r.content == env.store.get(cid)
    r = env.client.get(f"/ipfs/{cid}?format=car")
    roots, blocks = read_car(io.BytesIO(r.content))
    assert roots == [cid] and {c for c, _ in blocks} == {c for c, _ in env.store.dag(cid)}
    absent = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
    assert env.client.get(f"/ipfs/{absent}?format=raw").status_code == 404
    assert env.client.get("/ipfs/Qm0OIl?format=raw").status_code == 400
    assert env.client.get(f"/ipfs/{cid}").status_code == 400  # a trustless gateway needs format=raw|car


def test_gateway_cars_follow_the_trustless_gateway_spec(env: Env) -> None:
    _, cid = env.make("car-spec")
    whole = env.client.get(f"/ipfs/{cid}", headers={"accept": "application/vnd.ipld.car"})
    folder = env.client.get(f"/ipfs/{cid}?format=car&dag-scope=entity")
    root = env.client.get(f"/ipfs/{cid}?format=car&dag-scope=block")
    dups = env.client.get(f"/ipfs/{cid}", headers={"accept": "application/vnd.ipld.car; order=dfs; dups=y"})
    v2 = env.client.get(f"/ipfs/{cid}?format=car&car-version=2")
    ranged = env.client.get(f"/ipfs/{cid}?format=car&entity-bytes=0:99")

    # dag-scope=all by default: every block once, depth-first in link order, as the header says
    assert whole.headers["content-type"] == "application/vnd.ipld.car; version=1; order=dfs; dups=n"
    assert whole.headers["etag"]
    assert whole.headers["content-disposition"] == f'attachment; filename="{cid}.car"'
    assert list(read_car(io.BytesIO(whole.content))[1]) == list(env.store.dag(cid))
    assert list(read_car(io.BytesIO(folder.content))[1]) == [(cid, env.store.get(cid))]  # its own block
    assert list(read_car(io.BytesIO(root.content))[1]) == [(cid, env.store.get(cid))]
    assert dups.status_code == v2.status_code == 406 and ranged.status_code == 400


def test_pages_escape_hostile_text_and_show_provenance(env: Env) -> None:
    e, c = env.make("xss-test", campaign=XSS, license="Apache-2.0",
                    datasets=[{"cid": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", "name": XSS,
                               "license": "CC-BY-NC-4.0"}],
                    eval={"task": XSS, "description": XSS, "accuracy_base": 0.2, "accuracy_adapter": 0.3,
                          "curve": [{"round": 0, "loss": 2.0, "accuracy": "<script>"},
                                    {"round": 1, "loss": 1.0}]})
    assert env.announce(json.loads(e), c).status_code == 201
    for url in ["/", "/?q=xss", "/adapters/xss-test", "/?q=" + XSS, "/leaderboard", "/stats"]:
        html = env.client.get(url).text
        assert "<script>alert" not in html and "<img src=x" not in html, url
    page = env.client.get("/adapters/xss-test").text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "non-commercial" in page and "Licence conflict" in page
    assert "<svg" in page and "<polyline" in page
    assert "commons pull xss-test" in page and "from commons import load_adapter" in page
    assert 'load_adapter("HuggingFaceTB/SmolLM2-135M-Instruct", "xss-test")' in page
    assert env.me.public_hex in page and "$4.80" in page and "signature verified" in page
    assert env.client.get("/adapters/unknown-name").status_code == 404


def test_dataset_pages(env: Env) -> None:
    e, c = env.make("chat-pairs", kind="dataset", campaign="", license="CC-BY-4.0", ledger=[],
                    eval={"records": 12, "pii_removed": {"email": 3}})
    assert env.announce(json.loads(e), c).status_code == 201
    listing = env.client.get("/datasets").text
    assert "chat-pairs" in listing and "CC-BY-4.0" in listing
    page = env.client.get("/datasets/chat-pairs").text
    assert "email: 3" in page and "dataset" in page
    assert [d["name"] for d in env.client.get("/api/datasets").json()] == ["chat-pairs"]


def test_presence_counts_live_nodes_and_refuses_stale_or_forged(env: Env) -> None:
    node = Identity.generate()
    now = int(time.time())

    def body(ts: int, signer: Identity = node) -> dict:
        sig = signer.sign(f"commons-presence:{node.public_hex}:{ts}".encode()).hex()
        return {"node": node.public_hex, "timestamp": ts, "signature": sig}

    assert env.client.post("/api/presence", json=body(now)).status_code == 204
    assert env.client.get("/api/stats").json()["live_nodes"] == 1
    r = env.client.post("/api/presence", json=body(now - 3600))
    assert r.status_code == 403 and "minutes" in _one_line(r)
    r = env.client.post("/api/presence", json=body(now, Identity.generate()))
    assert r.status_code == 403 and "does not verify" in _one_line(r)


def test_write_rate_limit_and_body_size_limit(tmp_path: Path) -> None:
    env = Env(tmp_path, write_rate=0.01, write_burst=3, max_body=4096)
    codes = [env.client.post("/api/announce", json={"envelope": "x", "cid": "y"}).status_code
             for _ in range(5)]
    assert codes[:3] == [400, 400, 400] and codes[3:] == [429, 429]
    r = env.client.post("/api/announce", json={})
    assert "retry in" in _one_line(r) and int(r.headers["retry-after"]) >= 1
    assert env.client.get("/api/stats").status_code == 200  # reads are not limited
    big = Env(tmp_path / "big", max_body=4096)
    r = big.client.post("/api/announce", json={"envelope": "A" * 10_000, "cid": "y"})
    assert r.status_code == 413 and "over 4096 bytes" in _one_line(r)

    def chunks():  # no content-length: the limit must still hold while streaming
        for _ in range(10):
            yield b"A" * 1000

    r = big.client.post("/api/announce", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_index_on_a_copied_store_keeps_serving(tmp_path: Path) -> None:
    """The database and the block store are plain files: copying both moves the index."""
    env = Env(tmp_path / "a")
    e, c = env.make("portable")
    env.announce(json.loads(e), c)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = TestClient(create_app(IndexDB(f"sqlite:///{tmp_path / 'b' / 'index.db'}"),
                                  BlockStore(tmp_path / "b" / "blocks")))
    assert moved.get("/api/resolve/portable").json()["cid"] == c
    assert moved.get(f"/ipfs/{c}?format=raw").status_code == 200


def test_serve_cli_help_and_unusable_database_is_one_line_error(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from commons.cli.index import index_group
    from protocol.errors import CommonsError

    monkeypatch.setenv("COMMONS_HOME", str(tmp_path))
    runner = CliRunner()
    assert "--port" in runner.invoke(index_group, ["serve", "--help"]).output
    for url in ["notadb://x", "postgresql+psycopg://nobody@127.0.0.1:1/none"]:
        result = runner.invoke(index_group, ["serve", "--db", url])
        assert isinstance(result.exception, CommonsError), result.output
        assert "cannot open the index database" in str(result.exception) and "\n" not in str(result.exception)


def test_signed_but_odd_metadata_still_renders(env: Env) -> None:
    """A valid signature says who published it, not that its free-form fields are well-formed."""
    e, c = env.make("odd",
                    eval={"curve": "not a list", "accuracy_base": "high", "task": ["a"], "description": 7},
                    ledger=[{"node": 123, "rounds": "two", "tokens": "many"}, {"tokens": 5}],
                    datasets=[{"weird": True}], contributors=[])
    assert env.announce(json.loads(e), c).status_code == 201
    for url in ["/", "/adapters/odd", "/leaderboard", "/stats", "/api/adapters/odd", "/api/leaderboard"]:
        assert env.client.get(url).status_code == 200, url
    assert env.client.get("/api/adapters/odd").json()["cost_usd"] == 0.0
