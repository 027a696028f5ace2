"""`commons car export|import`: move DAGs in and out of the block store as CAR files (`ipfs dag export`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from commons.cli.output import emit
from protocol.content import car as carfile
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID
from protocol.errors import CommonsError


def _bar(label: str, unit: str) -> Any:
    """A tqdm bar on stderr, silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(desc=label, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


@click.group("car")
def car_group() -> None:
    """Export a DAG to a CAR file or import one into the local block store."""


@car_group.command("export")
@click.argument("cid")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print {cid, path, blocks, bytes} as JSON.")
def export_command(cid: str, out: Path, as_json: bool) -> None:
    """Write the DAG under CID from the store to OUT (same bytes as `ipfs dag export CID`)."""
    CID.decode(cid)
    store = BlockStore()
    missing = store.missing(cid)
    if missing:
        raise CommonsError(f"{len(missing)} block(s) of {cid} are not in the store (first: {missing[0]}): "
                           f"run `commons pull {cid}` first")
    tmp = out.with_name(out.name + ".partial")
    blocks = size = 0
    with _bar("exporting", "block") as bar, tmp.open("wb") as fh:
        def counted() -> Iterator[tuple[str, bytes]]:
            nonlocal blocks, size
            for item in store.dag(cid):
                blocks += 1
                size += len(item[1])
                bar.update(1)
                yield item

        carfile.write_car(fh, [cid], counted())
    os.replace(tmp, out)
    emit(as_json, {"cid": cid, "path": str(out), "blocks": blocks, "bytes": size},
         f"exported {cid} ({blocks} blocks) to {out}")


@car_group.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print {roots, blocks, complete} as JSON.")
def import_command(path: Path, as_json: bool) -> None:
    """Verify every block of the CAR file at PATH and add them to the store; print its roots."""
    if not path.is_file():
        raise CommonsError(f"no such file: {path}: check the path")
    store = BlockStore()
    count = 0
    with path.open("rb") as fh, _bar("importing", "block") as bar:
        roots, blocks = carfile.read_car(fh)
        for cid, data in blocks:
            store.put(cid, data)
            count += 1
            bar.update(1)
    complete = {root: not store.missing(root) for root in roots}

    def text() -> None:
        for root in roots:
            note = "" if complete[root] else " (incomplete: some blocks were not in the file)"
            click.echo(f"{root}{note}")

    emit(as_json, {"roots": roots, "blocks": count, "complete": complete}, text)


commands = [car_group]
