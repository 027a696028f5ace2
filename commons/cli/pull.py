"""`commons pull`: fetch a signed adapter by name or CID, verify it, lay out a PEFT folder."""

from __future__ import annotations

from pathlib import Path

import click

from commons.cli.output import emit


@click.command("pull")
@click.argument("ref")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="New or empty folder to write, or an earlier pull of the same name (default: cache).")
@click.option("--index", "index_url", help="Index URL (default: index_url in config.toml).")
@click.option("--allow-older", is_flag=True,
              help="Take a version older than one already seen here (you mean this old version).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def pull_command(ref: str, out: Path | None, index_url: str | None, allow_older: bool, as_json: bool) -> None:
    """Pull NAME[@VERSION] or a CID: every block and the signature are verified before anything is kept.

    --out must be a new or empty folder, or an earlier pull of the same name (replaced); nothing else there
    is ever deleted.
    """
    from commons.pull import pull

    pulled = pull(ref, out=out, index_url=index_url, progress=not as_json, allow_older=allow_older)
    meta = pulled.verified.meta

    def text() -> None:
        signer = pulled.verified.signer
        click.echo(f"pulled {meta.name} v{meta.version} ({pulled.cid}), signature by {signer[:16]}… verified")
        click.echo(f"  {pulled.path}\n\nLoad it:\n")
        click.echo(pulled.python())

    emit(as_json, {"cid": pulled.cid, "name": meta.name, "version": meta.version, "path": str(pulled.path),
                   "base_model": meta.base_model, "signer": pulled.verified.signer}, text)


commands = [pull_command]
