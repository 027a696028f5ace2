"""Publish chat data to the commons: validate, scrub PII, dedupe, then protocol.publishing's one path
(next version from the index, sign, store, register)."""

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


def publish_dataset(file: Path, license_: str, source: str, name: str | None = None,
                    db_url: str | None = None, choose: Callable[[list[dict]], list[dict]] | None = None,
                    on_report: Callable[[Report], None] | None = None) -> dict:
    """Returns {cid, name, version, unchanged, records, ...}; the same records again keep their CID.

    `on_report` sees what was scrubbed and dropped; `choose` (the volunteer's review) keeps a subset.
    """
    from index.db import IndexDB
    from protocol.publishing import latest, publish
    from protocol.signing.keys import Identity
    from protocol.signing.manifest import AdapterMeta

    # check, scrub, dedupe; the volunteer keeps what they choose
    identity = Identity.load_or_create()
    records, report = prepare(file, license_, source, identity.public_hex, progress=progress_bar("checking"))
    if on_report:
        on_report(report)
    if choose:
        records = choose(records)
        report.records = len(records)
    # the same records as the latest version: nothing to publish
    name = name or dataset_name(file)
    db = IndexDB(db_url)
    data = encode_records(records)
    digest = hashlib.sha256(data).hexdigest()
    last = latest(db, name)
    if last and any(f.get("name") == DATA_FILE and f.get("sha256") == digest for f in last["files"]):
        return {"cid": last["cid"], "name": name, "version": last["version"], "unchanged": True,
                **report.as_dict()}

    # the next version from the index, signed, stored and registered; its folder is named after it
    def write(version: int) -> Path:
        out = home() / "datasets" / f"{name}-v{version}"
        if out.exists():
            shutil.rmtree(out)  # left over from an interrupted run: nothing there was published
        out.mkdir(parents=True)
        (out / DATA_FILE).write_bytes(data)
        card = dataset_card(name, records[0]["license"], source, report)
        (out / "README.md").write_text(card, encoding="utf-8")
        return out

    summary = {"records": report.records, "duplicates": report.duplicates, "source": source,
               "pii_removed": dict(sorted(report.pii.items())),
               "description": f"{report.records} chat records from {source}"}
    meta = AdapterMeta(name=name, kind="dataset", license=records[0]["license"],
                       contributors=[identity.public_hex], eval=summary)
    published = publish(write, meta, db, identity=identity)
    return {"cid": published.cid, "name": name, "version": published.meta.version,
            "path": str(published.folder), "unchanged": False, **report.as_dict()}
