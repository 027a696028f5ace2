"""`commons keys ...`: your ed25519 identity (signs adapters, is your libp2p peer id) and whom you trust.

`commons keys export --pem` prints the P-256 public key your model.sig bundles are signed with, the one
OpenSSF's `model_signing verify key --public_key` wants.
"""

from __future__ import annotations

import click

from commons.cli.output import emit
from protocol.signing import trust
from protocol.signing.keys import Identity, default_key_path, parse_public_hex, rotate


def _identity() -> Identity:
    path = default_key_path()
    created = not path.exists()
    identity = Identity.load_or_create(path)
    if created:
        click.echo(f"created a new identity at {path} (back it up; it cannot be recovered)", err=True)
    return identity


@click.group("keys")
def keys_group() -> None:
    """Your ed25519 identity and the keys you trust or revoke.

    The key lives in $COMMONS_HOME/identity/ed25519.key (mode 0600) and is created on first use, as is
    the P-256 key it vouches for (ed25519.p256.pem beside it), which signs model.sig bundles.
    """


@keys_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print {public_key, peer_id, path} as JSON.")
def show(as_json: bool) -> None:
    """Print your public key (hex), libp2p peer id and key file path."""
    identity = _identity()
    info = {"public_key": identity.public_hex, "peer_id": identity.peer_id(), "path": str(identity.path)}
    emit(as_json, info, f"public key  {info['public_key']}\npeer id     {info['peer_id']}\n"
                        f"key file    {info['path']}")


@keys_group.command("export")
@click.option(
    "--public/--secret",
    "public",
    default=True,
    show_default=True,
    help="Print the public key (default) or the secret seed (64 hex characters).",
)
@click.option(
    "--pem",
    is_flag=True,
    help="Print the P-256 public key (PEM) that signs your model.sig, for `model_signing --public_key`.",
)
def export(public: bool, pem: bool) -> None:
    """Print your key: the public key by default, the secret seed only with --secret.

    Example: commons keys export --pem > key.pub
    """
    if pem and not public:
        raise click.UsageError("--pem prints the P-256 public key only; drop --secret")
    identity = _identity()
    if pem:
        click.echo(identity.p256.public_pem().decode("ascii"), nl=False)
        return
    if public:
        click.echo(identity.public_hex)
        return
    click.echo("warning: this is your SECRET key; anyone who sees it can sign as you", err=True)
    click.echo(identity.secret_seed.hex())


@keys_group.command("rotate")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print {old, new, archive, revoked_file} as JSON.")
def rotate_command(yes: bool, as_json: bool) -> None:
    """Make a new key; the old one is archived and added to your revocation list.

    Adapters signed with the old key stop verifying on this machine; names pinned to it move to the new key.
    """
    if not yes:
        click.confirm("Replace your signing key and revoke the current one?", abort=True, err=True)
    old, new, archive = rotate()
    info = {
        "old": old.public_hex,
        "new": new.public_hex,
        "peer_id": new.peer_id(),
        "archive": str(archive),
        "revoked_file": str(trust.trust_dir() / trust.REVOKED_KEYS),
    }
    emit(as_json, info, f"new key {new.public_hex} (peer id {info['peer_id']})\n"
                        f"old key {old.public_hex} archived at {archive} and revoked")


@keys_group.command("trust")
@click.argument("public_key")
@click.option("--note", default="", help="A comment stored next to the key (who it is).")
def trust_command(public_key: str, note: str) -> None:
    """Trust a signer's hex public key.

    Once $COMMONS_HOME/trust/trusted_keys exists, only the keys in it are accepted
    (no more trust on first use).
    """
    key = parse_public_hex(public_key).hex()
    own = default_key_path()
    if not (trust.trust_dir() / trust.TRUSTED_KEYS).exists() and own.exists():
        trust.trust_key(
            Identity.load(own).public_hex, "this node"
        )  # an allowlist must not lock out our own work
    path = trust.trust_key(key, note)
    click.echo(f"trusted {key} (in {path}); only keys listed there are accepted now")


@keys_group.command("revoke")
@click.argument("public_key")
@click.option("--note", default="", help="A comment stored next to the key (why).")
def revoke_command(public_key: str, note: str) -> None:
    """Refuse everything signed by a hex public key from now on."""
    key = parse_public_hex(public_key).hex()
    path = trust.revoke_key(key, note)
    click.echo(f"revoked {key} (in {path})")


commands = [keys_group]
