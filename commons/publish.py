"""Publish a folder: sign it, store it content-addressed, register it in the local index.

    >>> with publishing():                                  # one publish at a time in this home
    ...     version, previous = next_version(IndexDB(), name)
    ...     entry = publish(folder, meta_from_folder(folder, name, "MIT", version=version), db)

The version is read from the index, signed into the manifest and then registered: two publishes of one
name at once would both sign the same version, so `publishing()` serializes them.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol.content.blockstore import BlockStore
from protocol.errors import CommonsError
from protocol.home import home
from protocol.signing.keys import Identity
from protocol.signing.manifest import SIGNATURE_FILE, AdapterMeta, sign_directory


@contextmanager
def publishing() -> Iterator[None]:
    """Hold this home's publish lock (released when the process dies, however it dies)."""
    with open(home() / "publish.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def next_version(db, name: str) -> tuple[int, str | None]:
    try:
        latest = db.resolve(name)
    except CommonsError:
        return 1, None
    return int(latest["version"]) + 1, latest["cid"]


def meta_from_folder(folder: Path, name: str, license: str, **extra) -> AdapterMeta:
    config_file = folder / "adapter_config.json"
    base_model, revision, lora = "", "", {}
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except ValueError:
            raise CommonsError(f"{config_file} is not valid JSON; re-save the adapter with PEFT") from None
        base_model = config.get("base_model_name_or_path") or ""
        revision = config.get("revision") or ""
        lora = {k: config[k] for k in ("r", "lora_alpha", "target_modules", "lora_dropout") if k in config}
        if isinstance(lora.get("target_modules"), list):
            lora["target_modules"] = sorted(lora["target_modules"])
    elif extra.get("kind", "adapter") == "adapter":
        raise CommonsError(f"{folder} has no adapter_config.json: publish a PEFT adapter folder")
    return AdapterMeta(name=name, license=license, base_model=base_model, base_revision=revision, lora_config=lora, **extra)


def publish(folder: Path, meta: AdapterMeta, db, identity: Identity | None = None) -> dict:
    """Sign (unless an existing model.sig already verifies), add to the store, register; returns the index entry."""
    identity = identity or Identity.load_or_create()
    sign_directory(folder, meta, identity)
    cid = BlockStore().add_path(folder)
    return db.register((folder / SIGNATURE_FILE).read_bytes(), cid)
