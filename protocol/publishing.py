"""Publish a folder: the next version from the index, sign, store, register. The one path that `commons
publish`, `commons data add` and the coordinator all take.

    >>> published = publish(folder, meta, IndexDB())      # meta's version and previous come from the index
    >>> published.cid, published.meta.version, published.entry

    index given ──▶ its latest version of NAME + 1 ──┐
    no index    ──▶ this home's record of NAME + 1 ──┴─▶ sign (model.sig) ─▶ block store ─▶ register ─▶ record

The index is the one source of truth for versions. A process that cannot open one passes none: the
coordinator's ServerApp (coordinator/ never imports index/; `commons coordinator start` registers its
adapter afterwards). Its fallback is this home's publish record, `$COMMONS_HOME/published.json`
(`{name: {"version": N, "cid": CID}}`): every publish in this home writes it, whichever index it asked,
and `follow` copies the index's latest version into it (`commons coordinator start` does, before the run),
so the record never lags the index it stands in for.

Each publish reads the version, signs it and registers it under this home's publish lock: two publishes
of one name at once would otherwise both sign the same version.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from protocol.content.blockstore import BlockStore
from protocol.errors import CommonsError
from protocol.home import home
from protocol.signing.keys import Identity
from protocol.signing.manifest import SIGNATURE_FILE, AdapterMeta, sign_directory

RECORD = "published.json"  # this home's record: what it last published under each name
LOCK = "publish.lock"


class Index(Protocol):
    """What publishing asks of an index; `index.db.IndexDB` is one."""

    def resolve(self, name: str) -> dict:
        """The latest entry of `name` ({"version", "cid", ...}); CommonsError when there is none."""
        ...

    def register(self, envelope: bytes, cid: str) -> dict:
        """Record a signed model.sig under its folder's root CID; returns the entry."""
        ...


@dataclass(frozen=True)
class Published:
    cid: str  # the signed folder's root CID, in the block store
    meta: AdapterMeta  # as signed: version and previous filled in
    folder: Path
    entry: dict | None  # the index's entry; None when no index was given


@contextmanager
def publishing() -> Iterator[None]:
    """Hold this home's publish lock (released when the process dies, however it dies)."""
    with open(home() / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def latest(index: Index | None, name: str) -> dict | None:
    """The newest version of `name`, {"version", "cid", ...}: the index's entry, or without an index
    this home's record; None when there is none yet."""
    if index is None:
        noted = _read_record().get(name)
        return noted if isinstance(noted, dict) and isinstance(noted.get("version"), int) else None
    try:
        return index.resolve(name)
    except CommonsError:  # the index has no such name: this is its first version
        return None


def publish(folder: Path | Callable[[int], Path], meta: AdapterMeta, index: Index | None, *,
            identity: Identity | None = None, store: BlockStore | None = None) -> Published:
    """Sign `folder` as the next version of `meta.name`, add it to the block store, register it.

    `meta.version` and `meta.previous` are ignored: the index (else this home's record) decides them.
    `folder` may be a function of the version that writes the folder and returns it (a dataset's folder
    is named after its version). Raises CommonsError when the folder cannot be signed, and whatever the
    index's register raises (index.db.ConflictError: the name is another signer's).
    """
    with publishing():
        # the next version: one more than the newest the index knows
        last = latest(index, meta.name)
        version = int(last["version"]) + 1 if last else 1
        meta = replace(meta, version=version, previous=last["cid"] if last else None)
        folder = folder(version) if callable(folder) else folder
        # sign, store, register
        sign_directory(folder, meta, identity or Identity.load_or_create())
        cid = (store or BlockStore()).add_path(folder)
        entry = None if index is None else index.register((folder / SIGNATURE_FILE).read_bytes(), cid)
        _write_record(meta.name, version, cid)
    return Published(cid=cid, meta=meta, folder=folder, entry=entry)


def follow(index: Index, name: str) -> None:
    """Copy the index's latest version of `name` into this home's record, for a process that will
    publish without the index (the coordinator's ServerApp)."""
    with publishing():
        last = latest(index, name)
        if last is not None:
            _write_record(name, int(last["version"]), last["cid"])


def _read_record() -> dict:
    try:
        record = json.loads((home() / RECORD).read_text())
    except (OSError, ValueError):  # none yet, or cut short: nothing published from this home
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(name: str, version: int, cid: str) -> None:
    record = _read_record()
    record[name] = {"version": version, "cid": cid}
    path = home() / RECORD
    tmp = path.with_name(f".{RECORD}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
