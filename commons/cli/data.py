"""`commons data add|review`: give chat data to the commons, scrubbed, deduplicated and signed."""

from __future__ import annotations

from pathlib import Path

import click

from commons.cli.output import emit
from commons.datasets import progress_bar, publish_dataset
from protocol.data.dataset import Report, prepare
from protocol.data.pii import describe
from protocol.errors import CommonsError


def show_record(record: dict, index: int, total: int) -> None:
    click.echo(click.style(f"--- record {index}/{total} (after scrubbing) ---", bold=True))
    for msg in record["messages"]:
        click.echo(f"{click.style(msg['role'], fg='cyan')}: {msg['content']}")


def print_report(report: Report) -> None:
    click.echo(f"read {report.lines} conversations ({report.sharegpt} converted from ShareGPT); "
               f"{report.duplicates} duplicates dropped; {report.records} kept", err=True)
    click.echo(f"PII removed: {describe(report.pii)}", err=True)


def review(records: list[dict]) -> list[dict]:
    """Ask about each record; only the ones the volunteer says yes to are kept."""
    kept = []
    for i, record in enumerate(records, 1):
        show_record(record, i, len(records))
        if click.confirm("Publish this record?", default=False):
            kept.append(record)
    if not kept:
        raise CommonsError("you declined every record; nothing was published")
    return kept


@click.group("data")
def data_group() -> None:
    """Share prompt–output data with the commons (checked, PII-scrubbed, signed)."""


@data_group.command("add")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--license", "license_", required=True, help="SPDX id of the data's licence, e.g. CC-BY-4.0.")
@click.option("--source", required=True, help="Where the data comes from: a URL or one sentence.")
@click.option("--name", default=None, help="Dataset name in the index (default: the file's stem).")
@click.option("--review", "ask", is_flag=True,
              help="Show each scrubbed record and ask y/n before publishing.")
@click.option("--db", "db_url", default=None, help="Index database URL (default: $COMMONS_HOME/index.db).")
@click.option("--json", "as_json", is_flag=True, help="Print {cid, name, version, records, ...} as JSON.")
def add_command(file: Path, license_: str, source: str, name: str | None, ask: bool, db_url: str | None,
                as_json: bool) -> None:
    """Validate FILE (chat `messages` JSONL or ShareGPT), scrub PII, dedupe, sign and store it.

    Each line is {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    or ShareGPT's {"conversations": [{"from": "human", "value": ...}, ...]}. Prints the dataset CID.
    """
    result = publish_dataset(file, license_, source, name, db_url, choose=review if ask else None,
                             on_report=print_report)
    emit(as_json, result, lambda: _done(result), sort_keys=True)


def _done(result: dict) -> None:
    if result["unchanged"]:
        click.echo(f"{result['name']} v{result['version']} already holds these records", err=True)
    else:
        click.echo(f"published {result['name']} v{result['version']} ({result['records']} records)", err=True)
    click.echo(result["cid"])


@data_group.command("review")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--show", default=5, show_default=True, help="How many scrubbed records to print.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (counts per PII kind) as JSON.")
def review_command(file: Path, show: int, as_json: bool) -> None:
    """Dry run: what `data add` would keep and remove from FILE; nothing is signed or stored."""
    records, report = prepare(file, "CC0-1.0", "review", "", progress=progress_bar("checking"))

    def text() -> None:
        for i, record in enumerate(records[:show], 1):
            show_record(record, i, len(records))
        print_report(report)

    emit(as_json, report.as_dict(), text, sort_keys=True)


commands = [data_group]
