"""One publish path (protocol.publishing): `commons publish`, `commons data add` and the coordinator take
the next version from the index; the coordinator, which cannot open it, from a record that follows it."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from fastapi.testclient import TestClient

from commons.cli import cli
from commons.datasets import publish_dataset
from commons.demo import follow_index
from index.app import create_app
from index.db import IndexDB
from index.sample import make_entry, sample_meta, write_adapter_files
from protocol.content.blockstore import BlockStore
from protocol.publishing import RECORD, latest, publish
from protocol.signing.keys import Identity
from protocol.signing.manifest import SIGNATURE_FILE

OLD_CID = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"


def served_index(home: Path, name: str, versions: int) -> TestClient:
    """This home's index holding `versions` versions of NAME (signed by this home's key), behind its API."""
    db = IndexDB()
    store = BlockStore()
    me = Identity.load_or_create()
    for version in range(1, versions + 1):
        folder = home / "earlier" / f"{name}-{version}"
        db.register(*make_entry(folder, sample_meta(name, version), me, store))
    return TestClient(create_app(db, store))


def resolved(index: TestClient, name: str) -> dict:
    reply = index.get(f"/api/resolve/{name}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_commons_publish_signs_the_version_after_the_indexs_latest(tmp_path: Path,
                                                                   isolated_home: Path) -> None:
    index = served_index(isolated_home, "shared", 2)
    before = resolved(index, "shared")
    folder = tmp_path / "adapter"
    write_adapter_files(folder, sample_meta("shared"))

    done = CliRunner().invoke(cli, ["publish", str(folder), "--name", "shared", "--license", "MIT", "--json"])

    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout)
    after = resolved(index, "shared")
    assert printed["version"] == after["version"] == 3
    assert after["cid"] == printed["cid"] and after["meta"]["previous"] == before["cid"]


def test_the_coordinator_signs_the_version_after_the_indexs_latest_not_its_stale_record(
    tmp_path: Path, isolated_home: Path
) -> None:
    index = served_index(isolated_home, "dates", 2)
    before = resolved(index, "dates")
    (isolated_home / RECORD).write_text(json.dumps({"dates": {"version": 1, "cid": OLD_CID}}))  # an old run's
    folder = tmp_path / "adapter"
    meta = sample_meta("dates", version=2, previous=OLD_CID)  # what runner.finish builds from that record
    write_adapter_files(folder, meta)

    follow_index("dates")  # `commons coordinator start`, before it submits the run
    published = publish(folder, meta, None)  # the ServerApp (runner.finish): no index
    IndexDB().register((folder / SIGNATURE_FILE).read_bytes(), published.cid)  # `coordinator start`, after it

    after = resolved(index, "dates")
    assert published.meta.version == after["version"] == 3
    assert published.meta.previous == after["meta"]["previous"] == before["cid"]
    assert after["cid"] == published.cid


def test_commons_data_add_publishes_the_version_after_the_indexs_latest(tmp_path: Path,
                                                                       isolated_home: Path) -> None:
    index = served_index(isolated_home, "chats", 2)
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")

    result = publish_dataset(data, "CC0-1.0", "a test")

    assert result["version"] == resolved(index, "chats")["version"] == 3
    assert result["path"].endswith("chats-v3")  # the folder is named after the version the index gave


def test_without_an_index_the_version_follows_what_this_home_last_published(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    write_adapter_files(first, sample_meta("solo"))
    write_adapter_files(second, sample_meta("solo"))
    (second / "README.md").write_text("retrained\n")
    published = publish(first, sample_meta("solo"), IndexDB())  # `commons publish`

    again = publish(second, sample_meta("solo"), None)  # the coordinator's ServerApp

    assert (again.meta.version, again.meta.previous) == (2, published.cid)
    assert latest(None, "solo") == {"version": 2, "cid": again.cid}
