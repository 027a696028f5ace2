"""Publish chat data to the commons: validate, scrub PII, dedupe, sign, store, register."""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from protocol.data.dataset import Report, dataset_card, encode_records, prepare
from protocol.errors import CommonsError
from protocol.home import home

DATA_FILE = "data.jsonl"


def progress_bar(label: str):
    from tqdm import tqdm

    def wrap(items: Iterable) -> Iterable:
        return tqdm(items, desc=label, unit=" lines", file=sys.stderr, disable=not sys.stderr.isatty(),
                    leave=False)

    return wrap


def dataset_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._")[:100]
    if not name:
        raise CommonsError(f"cannot make a dataset name from {path.name!r}; pass --name")
    return name


def publish_dataset(file: Path, license_: str, source: str, name: str | None = None, db_url: str | None = None,
                    choose: Callable[[list[dict]], list[dict]] | None = None,
                    on_report: Callable[[Report], None] | None = None) -> dict:
    """Returns {cid, name, version, unchanged, records, ...}; the same records again keep their CID.

    `on_report` sees what was scrubbed and dropped; `choose` (the volunteer's review) keeps a subset.
    """
    from index.db import IndexDB
    from protocol.content.blockstore import BlockStore
    from protocol.signing.keys import Identity
    from protocol.signing.manifest import SIGNATURE_FILE, AdapterMeta, sign_directory

    identity = Identity.load_or_create()
    records, report = prepare(file, license_, source, identity.public_hex, progress=progress_bar("checking"))
    if on_report:
        on_report(report)
    if choose:
        records = choose(records)
        report.records = len(records)
    name = name or dataset_name(file)
    db = IndexDB(db_url)
    version, previous = 1, None
    try:
        last = db.resolve(name)
        version, previous = last["version"] + 1, last["cid"]
    except CommonsError:
        last = None
    data = encode_records(records)
    digest = hashlib.sha256(data).hexdigest()
    if last and any(f.get("name") == DATA_FILE and f.get("sha256") == digest for f in last["files"]):
        return {"cid": last["cid"], "name": name, "version": last["version"], "unchanged": True, **report.as_dict()}
    out = home() / "datasets" / f"{name}-v{version}"
    if out.exists():
        shutil.rmtree(out)  # left over from an interrupted run: nothing there was published
    out.mkdir(parents=True)
    (out / DATA_FILE).write_bytes(data)
    (out / "README.md").write_text(dataset_card(name, records[0]["license"], source, report), encoding="utf-8")
    meta = AdapterMeta(name=name, version=version, kind="dataset", license=records[0]["license"],
                       contributors=[identity.public_hex], previous=previous,
                       eval={"records": report.records, "duplicates": report.duplicates, "source": source,
                             "pii_removed": dict(sorted(report.pii.items())),
                             "description": f"{report.records} chat records from {source}"})
    sign_directory(out, meta, identity)
    cid = BlockStore().add_path(out)
    db.register((out / SIGNATURE_FILE).read_bytes(), cid)
    return {"cid": cid, "name": name, "version": version, "path": str(out), "unchanged": False, **report.as_dict()}


