"""`commons base path NAME`: where the exact base model an adapter was trained on lies on this machine."""

from __future__ import annotations

import click

from commons.cli.output import emit


@click.group("base")
def base_group() -> None:
    """Base models: the exact weights campaigns train on."""


@base_group.command("path")
@click.argument("name")
@click.option("--revision", default=None, help="A Hub revision (default: the one campaigns use for NAME).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def path_command(name: str, revision: str | None, as_json: bool) -> None:
    """Print the folder holding base model NAME (a Hub id or an alias such as smollm2), building or fetching
    it once: load it offline with `AutoModelForCausalLM.from_pretrained(FOLDER)`. The revision printed is what
    adapter manifests record as base_revision ("sha256:..." of the weights for a local conversion)."""
    from modeling.load import base_folder, canonical_id, default_revision, exact_revision

    model_id = canonical_id(name)
    revision = revision or default_revision(model_id)
    folder = base_folder(model_id, revision)
    hub = folder.parent.name == "snapshots"  # the Hub cache names each snapshot folder by its commit
    pinned = folder.name if hub else exact_revision(model_id, revision)

    def text() -> None:
        click.echo(str(folder))
        click.echo(f"{model_id} at {pinned}", err=True)

    emit(as_json, {"model": model_id, "path": str(folder), "revision": pinned}, text)


commands = [base_group]
