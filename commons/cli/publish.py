"""`commons publish`: sign a folder, store it content-addressed and register it in the local index."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("publish")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Adapter name: letters, digits, '.', '_' and '-'.")
@click.option("--license", "license_", required=True, help="SPDX licence id, e.g. Apache-2.0.")
@click.option("--kubo", help="Also push the DAG to this Kubo RPC API (http://127.0.0.1:5001) and pin it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def publish_command(folder: Path, name: str, license_: str, kubo: str | None, as_json: bool) -> None:
    """Sign FOLDER (a PEFT adapter), store it and register it; prints the adapter's root CID."""
    from commons.publish import meta_from_folder, next_version, publish
    from index.db import IndexDB
    from protocol.errors import CommonsError

    if not folder.is_dir():
        raise CommonsError(f"no such folder: {folder}; pass the adapter folder (adapter_config.json inside)")
    db = IndexDB()
    version, previous = next_version(db, name)
    meta = meta_from_folder(folder, name, license_, version=version, previous=previous)
    entry = publish(folder, meta, db)
    pushed = None
    if kubo:
        from protocol.blockstore import BlockStore
        from protocol.kubo import push_to_kubo

        pushed = push_to_kubo(kubo, BlockStore(), entry["cid"])
    if as_json:
        click.echo(json.dumps({"cid": entry["cid"], "name": name, "version": version, "kubo": pushed}))
    else:
        click.echo(entry["cid"])


commands = [publish_command]
