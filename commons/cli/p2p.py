"""`commons p2p ...`: seed blocks to peers, pull a DAG from peers, watch signed announcements,
push to a Kubo daemon, ask a remote pinning service to pin."""

from __future__ import annotations

import os
from pathlib import Path

import click

from commons.cli.output import emit, warn_unreached
from protocol.content.blockstore import BlockStore
from protocol.errors import CommonsError
from protocol.p2p.announce import TOPIC_ADAPTERS, TOPIC_DATASETS, TOPIC_PRESENCE
from protocol.signing.keys import Identity

# libp2p costs ~1 s to import: it is imported inside the commands that use it, so every other
# `commons` command starts fast
DEFAULT_PORT = 4051  # protocol.p2p.host.DEFAULT_PORT, which a test keeps equal
PEER_HELP = "Peer multiaddr with /p2p/<id>, as `commons p2p serve` prints (repeat for several)."


def _run(fn, *args):
    import trio

    from protocol.p2p.exchange import unwrap

    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        raise unwrap(group) from None


@click.group("p2p")
def p2p_group() -> None:
    """Peer-to-peer: seed and pull content-addressed blocks over bitswap, gossip signed announcements."""


@p2p_group.command("serve")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--listen", multiple=True, default=[f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"], show_default=True,
              help="Multiaddr to listen on (repeat for several).")
@click.option("--bootstrap", multiple=True, help=PEER_HELP)
@click.option("--rate-limit", type=float, default=None,
              help="Cap on bytes per second served (default: none).")
@click.option("--mdns", is_flag=True, help="Find and dial peers on the local network by mDNS.")
@click.option("--relay", is_flag=True, help="Relay for peers behind NATs (circuit relay v2); a public node.")
@click.option("--reserve", multiple=True, metavar="RELAY",
              help="Behind a NAT: be reachable through this relay's multiaddr (repeat for several).")
@click.option("--hole-punch", is_flag=True,
              help="With --reserve: try to turn relayed connections into direct ones (DCUtR).")
@click.option("--json", "as_json", is_flag=True, help="Print {peer_id, addrs, roots} as one JSON line.")
def serve(paths: tuple[Path, ...], listen: tuple[str, ...], bootstrap: tuple[str, ...],
          rate_limit: float | None, mdns: bool, relay: bool, reserve: tuple[str, ...], hole_punch: bool,
          as_json: bool) -> None:
    """Add PATHS (files or folders) to the block store, then seed every block it holds until Ctrl-C.

    The peer id is your identity key's (`commons keys show`).
    """

    def ready(info: dict) -> None:
        emit(as_json, info, lambda: _show_serving(info))

    from protocol.p2p.service import serve as serve_store

    _run(serve_store, BlockStore(), list(paths), list(listen), None, list(bootstrap), rate_limit, ready,
         "seed", mdns, relay, list(reserve), hole_punch)


def _show_serving(info: dict) -> None:
    for root in info["roots"]:
        click.echo(f"seeding {root}")
    click.echo(f"peer id {info['peer_id']}; pull with --peer one of:")
    for addr in info["addrs"] + info["circuit_addrs"]:
        click.echo(f"  {addr}")
    warn_unreached(info["bootstrap_errors"], info["relay_errors"])


@p2p_group.command("pull")
@click.argument("cid")
@click.option("--peer", "peers", multiple=True, required=True, help=PEER_HELP)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the file or folder here.")
@click.option("--json", "as_json", is_flag=True, help="Print the transfer report as JSON.")
def pull(cid: str, peers: tuple[str, ...], out: Path | None, as_json: bool) -> None:
    """Fetch every block of CID from peers over bitswap (commons nodes, Kubo, Helia), verifying each and
    resuming from what the store already holds."""
    from protocol.p2p.service import pull as pull_dag

    report = pull_dag(cid, BlockStore(), list(peers), out=out, progress=True)

    def text() -> None:
        click.echo(f"{report['root']}: {report['blocks']} blocks ({report['bytes'] / 1e6:.1f} MB) fetched at "
                   f"{report['mb_per_s']} MB/s, {report['already_held']} already held"
                   + (f"; written to {out}" if out else ""))
        for addr, why in report["peers_failed"].items():
            click.echo(f"warning: peer {addr} dropped: {why}", err=True)

    emit(as_json, report, text)


@p2p_group.command("watch")
@click.option("--bootstrap", multiple=True, required=True, help=PEER_HELP)
@click.option("--listen", multiple=True, default=["/ip4/0.0.0.0/tcp/0"], show_default=True)
@click.option("--count", type=int, default=0, help="Stop after this many announcements (default: never).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per verified announcement.")
def watch(bootstrap: tuple[str, ...], listen: tuple[str, ...], count: int, as_json: bool) -> None:
    """Print verified adapter, dataset and presence announcements (forged, stale,
    replayed ones are dropped)."""
    import trio

    from protocol.p2p.node import open_node

    async def main() -> None:
        async with open_node(BlockStore(), Identity.load_or_create(), listen, bootstrap, gossip=True) as node:
            if not node.host.get_connected_peers():
                raise CommonsError("no bootstrap peer reachable "
                                   f"({'; '.join(node.bootstrap_errors.values())})")
            seen = 0
            send, receive = trio.open_memory_channel(0)
            async with trio.open_nursery() as nursery:
                for topic in (TOPIC_ADAPTERS, TOPIC_DATASETS, TOPIC_PRESENCE):
                    nursery.start_soon(_forward, node.gossip, topic, send.clone())
                async for topic, signed in receive:
                    body = {"topic": topic, "signer": signed.signer, "timestamp": signed.timestamp,
                            **signed.body.__dict__}
                    emit(as_json, body, f"{topic} {signed.peer_id}: {signed.body}")
                    seen += 1
                    if count and seen >= count:
                        nursery.cancel_scope.cancel()

    _run(main)


async def _forward(gossip, topic: str, send) -> None:
    async with send:
        async for signed in gossip.messages(topic):
            await send.send((topic, signed))


@p2p_group.command("announce")
@click.argument("ref")
@click.option("--bootstrap", multiple=True, help=PEER_HELP + " Default: `peers` in config.toml.")
@click.option("--listen", multiple=True, default=["/ip4/0.0.0.0/tcp/0"], show_default=True)
@click.option("--seed-seconds", type=click.FloatRange(1, 86400), default=120, show_default=True,
              help="Seed at most this long; stops earlier once a peer (an index) re-announces the CID.")
@click.option("--json", "as_json", is_flag=True, help="Print the seeding report as JSON.")
def announce(ref: str, bootstrap: tuple[str, ...], listen: tuple[str, ...], seed_seconds: float,
             as_json: bool) -> None:
    """Announce REF (NAME or NAME@VERSION from your local index) on gossip and seed it meanwhile."""
    from dataclasses import asdict

    from commons import config
    from index.api import parse_ref
    from index.db import IndexDB
    from protocol.content.unixfs import iter_file, list_directory
    from protocol.p2p.announcer import announce_adapter
    from protocol.signing.manifest import SIGNATURE_FILE

    peers = list(bootstrap) or config.load()["peers"]
    if not peers:
        raise CommonsError("no peer to announce to: pass --bootstrap /ip4/.../p2p/12D3KooW... or set peers "
                           "in config.toml")
    entry = IndexDB().resolve(*parse_ref(ref))
    store = BlockStore()
    if store.missing(entry["cid"]):
        raise CommonsError(f"{ref} ({entry['cid']}) is not fully in your block store; `commons pull {ref}` "
                           "first")
    sig = next((c for path, c, _ in list_directory(store.get, entry["cid"]) if path == SIGNATURE_FILE), None)
    if sig is None:
        raise CommonsError(f"{entry['cid']} holds no {SIGNATURE_FILE}; sign it with `commons sign` and "
                           "publish")
    report = announce_adapter(entry["cid"], b"".join(iter_file(store.get, sig)), entry["name"],
                              entry["version"], store, Identity.load_or_create(), listen, peers, seed_seconds)
    held = (f"replicated by {', '.join(report.confirmed_by)}" if report.confirmed_by
            else "no peer confirmed a copy")
    emit(as_json, asdict(report), f"announced {entry['name']} v{entry['version']} ({entry['cid']}) "
                                  f"{report.announced}x in {report.seconds:.1f}s; {held}")


@p2p_group.command("kubo-push")
@click.argument("cid")
@click.option("--kubo", default="http://127.0.0.1:5001", show_default=True, help="Kubo RPC URL.")
@click.option("--provide", is_flag=True, help="Also announce the DAG to the IPFS DHT (routing/provide).")
@click.option("--json", "as_json", is_flag=True)
def kubo_push(cid: str, kubo: str, provide: bool, as_json: bool) -> None:
    """Import CID's DAG from the local store into a Kubo daemon (as a CAR) and pin it there."""
    from protocol.content.kubo import push_to_kubo

    root = push_to_kubo(kubo, BlockStore(), cid, provide=provide)
    emit(as_json, {"cid": root, "kubo": kubo, "pinned": True}, f"pinned {root} on {kubo}")


@p2p_group.command("pin")
@click.argument("cid")
@click.option("--endpoint", required=True, help="Pinning Service API root, e.g. https://api.pinata.cloud/psa")
@click.option("--token", default=lambda: os.environ.get("COMMONS_PINNING_TOKEN", ""),
              help="Bearer token (default: $COMMONS_PINNING_TOKEN).")
@click.option("--name", default=None, help="Human name for the pin.")
@click.option("--origin", "origins", multiple=True, help="Multiaddr of a peer holding the DAG (repeat).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Poll until pinned or failed.")
@click.option("--json", "as_json", is_flag=True)
def pin(cid: str, endpoint: str, token: str, name: str | None, origins: tuple[str, ...], wait: bool,
        as_json: bool) -> None:
    """Ask a remote pinning service to pin CID (IPFS Pinning Service API)."""
    from protocol.content.pinning import PinningClient

    with PinningClient(endpoint, token) as client:
        status = client.add(cid, name=name, origins=origins)
        if wait:
            status = client.wait(status.requestid)
    emit(as_json, status.__dict__, f"{status.cid}: {status.status} (request {status.requestid})")


commands = [p2p_group]
