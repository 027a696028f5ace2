"""`commons`: one click group; each command group lives in its own module here."""

from __future__ import annotations

import importlib
import sys

import click

from protocol.errors import CommonsError

# Each module exposes `commands`: a list of click commands/groups added to the top level.
COMMAND_MODULES = [
    "init", "cid", "car", "keys", "sign", "publish", "pull", "index", "data", "node", "coordinator", "demo",
    "p2p", "base",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-commons")
def cli() -> None:
    """LoRA Commons: fine-tune LLMs together, share signed LoRA adapters."""


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"commons.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"commons.cli.{name}":
                continue
            raise
        for command in module.commands:
            cli.add_command(command)


_register()


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except CommonsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
