"""`commons cid FILE`: the CID Kubo's `ipfs add` would print, computed locally."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from commons.cli.output import emit
from protocol.content import unixfs
from protocol.errors import CommonsError

_PROGRESS_FROM = 64 << 20  # show a bar only when there is enough to wait for


def total_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def make_progress(total: int, label: str) -> Any:
    """A tqdm bar on stderr for long work, else None."""
    if total < _PROGRESS_FROM or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False)


@click.command("cid")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--cid-version", type=click.IntRange(0, 1), default=0, show_default=True,
              help="0: Qm... with dag-pb leaves (Kubo default); 1: b... with raw leaves.")
@click.option("--json", "as_json", is_flag=True, help="Print {cid, path, cid_version, size} as JSON.")
def cid_command(path: Path, cid_version: int, as_json: bool) -> None:
    """Print the CID `ipfs add PATH` gives (a directory: the `ipfs add -r` root).

    Nothing is stored; use `commons publish` to keep the blocks.
    """
    if not os.path.lexists(path):
        raise CommonsError(f"no such file or directory: {path}: check the path")
    if path.is_symlink():
        raise CommonsError(f"{path} is a symlink: pass the file or directory it points to")
    size = total_size(path)
    bar = make_progress(size, "hashing")
    update = bar.update if bar else None
    try:
        if path.is_dir():
            cid = unixfs.import_directory(path, cid_version, progress=update)
        else:
            cid = unixfs.import_file(path, cid_version, progress=update)
    finally:
        if bar:
            bar.close()
    emit(as_json, {"cid": cid, "path": str(path), "cid_version": cid_version, "size": size}, cid)


commands = [cid_command]
