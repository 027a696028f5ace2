"""IndexDB on SQLite and on a real PostgreSQL: registration rules, search, resolve, stats."""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from index.db import ConflictError, IndexDB, metadata
from index.sample import make_entry, sample_meta
from protocol.errors import CommonsError, VerifyError
from protocol.signing.keys import Identity

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server from Debian's package, run as a non-root user."""
    if not PG_BIN:
        pytest.skip("PostgreSQL binaries missing: apt-get install -y postgresql")
    pytest.importorskip("psycopg", reason="psycopg missing: pip install 'psycopg[binary]'")
    # Not under pytest's tmp dir: that one is private to root, and the server runs as another user.
    bindir, root, port = Path(PG_BIN[-1]), Path(tempfile.mkdtemp(prefix="commons-pg-")), _free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        user = "postgres" if shutil.which("runuser") and _user_exists("postgres") else "nobody"
        shutil.chown(root, user)
        os.chmod(root, 0o700)
        prefix = ["runuser", "-u", user, "--"]
    data, log = root / "data", root / "log"
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                    "-o", (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                           "-c synchronous_commit=off -c full_page_writes=off"), "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> IndexDB:
    if request.param == "sqlite":
        return IndexDB(f"sqlite:///{tmp_path / 'index.db'}")
    url = request.getfixturevalue("postgres_url")
    fresh = IndexDB(url)
    metadata.drop_all(fresh.engine)  # every test starts from an empty index
    fresh.engine.dispose()
    return IndexDB(url)


class Publisher:
    """Signs real sample directories the way `commons publish` does."""

    def __init__(self, root: Path) -> None:
        self.root, self.me, self.n = root, Identity.generate(), 0

    def make(self, name: str, version: int = 1, identity: Identity | None = None, **fields: object
             ) -> tuple[bytes, str]:
        self.n += 1
        return make_entry(self.root / f"e{self.n}", sample_meta(name, version, **fields), identity or self.me)


@pytest.fixture
def pub(tmp_path: Path) -> Publisher:
    return Publisher(tmp_path / "entries")


def test_register_get_resolve_and_same_cid_twice_is_idempotent(db: IndexDB, pub: Publisher) -> None:
    env, cid = pub.make("gsm8k-smollm2")
    entry = db.register(env, cid)
    assert (entry["name"], entry["version"], entry["signer"]) == ("gsm8k-smollm2", 1, pub.me.public_hex)
    assert entry["tokens"] == 600_000 and entry["size"] == sum(f["size"] for f in entry["files"])
    assert db.register(env, cid) == entry
    assert db.get(cid)["meta"]["eval"]["accuracy_adapter"] == 0.34
    assert db.resolve("gsm8k-smollm2")["cid"] == cid
    assert db.stats()["adapter_versions"] == 1


def test_newer_version_becomes_latest_and_old_one_stays_resolvable(db: IndexDB, pub: Publisher) -> None:
    env1, cid1 = pub.make("math", 1)
    env2, cid2 = pub.make("math", 2, previous=cid1)
    db.register(env2, cid2)
    db.register(env1, cid1)  # registering history out of order must not demote v2
    assert db.resolve("math")["cid"] == cid2
    assert db.resolve("math", 1)["cid"] == cid1
    assert [e["version"] for e in db.search("math")] == [2]
    assert [v["version"] for v in db.versions("math")] == [2, 1]
    with pytest.raises(CommonsError, match="no version 7; known versions: 1, 2"):
        db.resolve("math", 7)


def test_different_envelope_under_a_registered_cid_is_refused(db: IndexDB, pub: Publisher) -> None:
    env, cid = pub.make("one")
    other, _ = pub.make("two")
    db.register(env, cid)
    with pytest.raises(ConflictError, match="already registered with a different manifest"):
        db.register(other, cid)
    assert db.resolve("one")["cid"] == cid
    with pytest.raises(CommonsError, match="no adapter or dataset named 'two'"):
        db.resolve("two")


def test_replayed_version_under_another_cid_is_refused(db: IndexDB, pub: Publisher) -> None:
    env, cid = pub.make("replay")
    db.register(env, cid)
    env_b, cid_b = pub.make("replay", 1, eval={"accuracy_adapter": 0.99})
    with pytest.raises(ConflictError, match="replay refused: replay v1 is already registered"):
        db.register(env_b, cid_b)


def test_another_signer_cannot_publish_under_a_taken_name(db: IndexDB, pub: Publisher) -> None:
    env, cid = pub.make("squat")
    db.register(env, cid)
    env2, cid2 = pub.make("squat", 2, identity=Identity.generate())
    with pytest.raises(ConflictError, match="is published by key .*pick another name"):
        db.register(env2, cid2)
    assert db.resolve("squat")["version"] == 1


def test_forged_and_malformed_envelopes_store_nothing(db: IndexDB, pub: Publisher) -> None:
    env, cid = pub.make("forged")
    doc = json.loads(env)
    payload = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    payload["predicate"]["commons"]["license"] = "MIT"  # tamper after signing
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload, sort_keys=True,
                                                                 separators=(",", ":")).encode()).decode()
    with pytest.raises(VerifyError):
        db.register(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), cid)
    with pytest.raises(VerifyError):
        db.register(b"not json at all", cid)
    with pytest.raises(CommonsError, match="is not a CID"):
        db.register(env, "Qm-not-a-cid")
    assert db.stats()["adapter_versions"] == 0


def test_search_full_text_filters_and_hostile_queries(db: IndexDB, pub: Publisher) -> None:
    db.register(*pub.make("gsm8k-smollm2", eval={"task": "gsm8k", "description": "grade-school arithmetic"}))
    db.register(*pub.make("python-coder", base_model="Qwen/Qwen2.5-0.5B", license="MIT",
                          eval={"task": "code", "description": "writes Python functions"}))
    db.register(*pub.make("sql-helper", license="CC-BY-NC-4.0", eval={"task": "code"}))
    names = lambda **kw: sorted(e["name"] for e in db.search(**kw))
    assert names(q="arithm") == ["gsm8k-smollm2"]  # prefix match in the description
    assert names(q="python functions") == ["python-coder"]
    assert names(q="coder") == ["python-coder"]
    assert names(q="smollm2") == ["gsm8k-smollm2", "sql-helper"]  # the base model id is searchable
    assert names(base_model="Qwen/Qwen2.5-0.5B") == ["python-coder"]
    assert names(license="CC-BY-NC-4.0") == ["sql-helper"]
    assert names(task="code") == ["python-coder", "sql-helper"]
    assert names(task="code", q="sql") == ["sql-helper"]
    assert names(q="") == ["gsm8k-smollm2", "python-coder", "sql-helper"]
    for hostile in ["' OR 1=1 --", '"unbalanced', "NEAR(a b", "x* AND", "%", "_", "\\",
                    "; DROP TABLE entries"]:
        assert db.search(q=hostile) == [] or all("drop" not in e["name"] for e in db.search(q=hostile))
    assert len(db.search()) == 3  # nothing was dropped
    assert db.search(limit=1, q="") and len(db.search(limit=1)) == 1


def test_stats_leaderboard_and_presence(db: IndexDB, pub: Publisher) -> None:
    db.register(*pub.make("a", campaign="c1"))
    db.register(*pub.make("b", campaign="c2", rounds=5,
                          ledger=[{"node": "cc" * 32, "rounds": 5, "tokens": 1_000_000}]))
    db.register(*pub.make("data-1", kind="dataset", campaign="", eval={}, ledger=[],
                          contributors=["dd" * 32]))
    db.record_presence("ee" * 32)
    db.record_presence("ff" * 32, seen_at=time.time() - 3600)  # gone an hour ago
    s = db.stats()
    assert (s["adapters"], s["datasets"], s["campaigns"], s["rounds"]) == (2, 1, 2, 8)
    assert s["contributors"] == 4 and s["live_nodes"] == 1
    assert s["tokens"] == 600_000 + 1_000_000
    board = db.leaderboard()
    assert board[0] == {"node": "cc" * 32, "rounds": 5, "tokens": 1_000_000, "adapters": 1}
    assert [r["node"] for r in board] == ["cc" * 32, "aa" * 32, "bb" * 32]
    assert [e["name"] for e in db.search(kind="dataset")] == ["data-1"]


def test_sqlite_index_persists_across_reopen(tmp_path: Path, pub: Publisher) -> None:
    url = f"sqlite:///{tmp_path / 'persist.db'}"
    env, cid = pub.make("kept")
    IndexDB(url).register(env, cid)
    again = IndexDB(url)
    assert again.resolve("kept")["cid"] == cid
    assert [e["name"] for e in again.search("kept")] == ["kept"]


def test_default_location_is_under_commons_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMONS_HOME", str(tmp_path / "home"))
    db = IndexDB()
    assert db.url == f"sqlite:///{tmp_path / 'home' / 'index.db'}"
    assert (tmp_path / "home" / "index.db").exists()
