"""`commons publish`: sign a folder, store it content-addressed and register it in the local index."""

from __future__ import annotations

from pathlib import Path

import click

from commons.cli.output import emit, say, warn_unreached

SEED_HELP = ("With --announce: keep seeding this long at most; stops earlier once a peer (an index) "
             "re-announces the CID, i.e. holds a copy.")


@click.command("publish")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Adapter name: letters, digits, '.', '_' and '-'.")
@click.option("--license", "license_", required=True, help="SPDX licence id, e.g. Apache-2.0.")
@click.option("--kubo", help="Also push the DAG to this Kubo RPC API (http://127.0.0.1:5001) and pin it.")
@click.option("--announce/--no-announce", default=None,
              help="Announce the new version on libp2p gossip and seed it "
                   "[default: on when `peers` is set in config.toml].")
@click.option("--bootstrap", multiple=True,
              help="Peer to announce to, /ip4/.../tcp/.../p2p/12D3KooW... (repeat; default: config `peers`).")
@click.option("--p2p-listen", multiple=True, default=["/ip4/0.0.0.0/tcp/0"], show_default=True,
              help="Where the seeding host listens while announcing.")
@click.option("--seed-seconds", type=click.FloatRange(1, 86400), default=120, show_default=True,
              help=SEED_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def publish_command(folder: Path, name: str, license_: str, kubo: str | None, announce: bool | None,
                    bootstrap: tuple[str, ...], p2p_listen: tuple[str, ...], seed_seconds: float,
                    as_json: bool) -> None:
    """Sign FOLDER (a PEFT adapter), store it and register it; prints the adapter's root CID."""
    from commons import config
    from commons.publish import meta_from_folder
    from index.db import IndexDB
    from protocol.errors import CommonsError
    from protocol.publishing import publish

    if not folder.is_dir():
        raise CommonsError(f"no such folder: {folder}; pass the adapter folder (adapter_config.json inside)")
    peers = list(bootstrap) or config.load()["peers"]
    if announce is None:
        announce = bool(peers)
    if announce and not peers:
        raise CommonsError("--announce needs a peer: pass --bootstrap /ip4/.../p2p/12D3KooW... (an index or "
                           "seeder) or set peers in config.toml")
    # the local index gives the version (another publish of this home waits for its turn)
    published = publish(folder, meta_from_folder(folder, name, license_), IndexDB())
    cid = published.cid
    version = published.meta.version
    pushed = None
    if kubo:
        from protocol.content.blockstore import BlockStore
        from protocol.content.kubo import push_to_kubo

        pushed = push_to_kubo(kubo, BlockStore(), cid)
    say(as_json, cid)  # at once: seeding below may take minutes
    seeded = None
    if announce:
        try:
            seeded = _announce(cid, folder, name, version, peers, p2p_listen, seed_seconds, as_json)
        except CommonsError as exc:
            raise CommonsError(f"{name} v{version} is published locally but not announced: {exc}; then run "
                               f"`commons p2p announce {name}@{version}`") from None
    emit(as_json, {"cid": cid, "name": name, "version": version, "kubo": pushed, "announce": seeded}, None)


def _announce(cid: str, folder: Path, name: str, version: int, peers: list[str], listen: tuple[str, ...],
              seed_seconds: float, quiet: bool) -> dict:
    from dataclasses import asdict

    from protocol.content.blockstore import BlockStore
    from protocol.p2p.announcer import announce_adapter
    from protocol.signing.keys import Identity
    from protocol.signing.manifest import SIGNATURE_FILE

    def ready(node) -> None:
        say(quiet, f"announcing {name} v{version}; seeding from {node.peer_id} for up to {seed_seconds:.0f}s "
                   "(until a peer holds a copy)", err=True)
        warn_unreached(node.bootstrap_errors)

    report = announce_adapter(cid, (folder / SIGNATURE_FILE).read_bytes(), name, version, BlockStore(),
                              Identity.load_or_create(), listen, peers, seed_seconds, on_ready=ready)
    held = f"replicated by {', '.join(report.confirmed_by)}" if report.confirmed_by else \
        "no peer confirmed a copy yet; run `commons p2p serve` to keep seeding"
    say(quiet, f"seeded {report.seconds:.1f}s; {held}", err=True)
    return asdict(report)


commands = [publish_command]
