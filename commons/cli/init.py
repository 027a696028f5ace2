"""`commons init`: create this machine's identity and config if missing."""

from __future__ import annotations

import click

from commons import config
from commons.cli.output import emit
from protocol.home import home
from protocol.signing.keys import Identity, default_key_path


@click.command("init")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def init_command(as_json: bool) -> None:
    """Create the identity key and config under $COMMONS_HOME (default ~/.commons); safe to re-run."""
    existed = default_key_path().exists()
    identity = Identity.load_or_create()
    wrote = config.write_default()
    info = {"home": str(home()), "public_key": identity.public_hex, "peer_id": identity.peer_id(),
            "created_identity": not existed, "created_config": wrote, "config": str(config.path())}
    emit(as_json, info, "\n".join([
        f"home        {info['home']}",
        f"identity    {identity.public_hex}  ({'new' if not existed else 'existing'})",
        f"peer id     {info['peer_id']}",
        f"config      {info['config']}  ({'new' if wrote else 'existing'})",
    ]))


commands = [init_command]
