"""`commons index serve`: run the public adapter index (pages, JSON API, trustless gateway)."""

from __future__ import annotations

import click

from commons.cli.output import warn_unreached
from protocol.errors import CommonsError


@click.group("index")
def index_group() -> None:
    """The web index of signed adapters and datasets."""


@index_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535),
              help="Port to listen on; refused if something already listens there.")
@click.option("--db", "db_url", default=None,
              help="SQLAlchemy URL (default sqlite:///$COMMONS_HOME/index.db; postgresql+psycopg://... "
                   "works).")
@click.option("--trusted-keys", type=click.Path(dir_okay=False, exists=True), default=None,
              help="File of hex signer keys to badge as trusted (default: $COMMONS_HOME/trust/trusted_keys).")
@click.option("--p2p-listen", multiple=True,
              help="Also run a libp2p host here (e.g. /ip4/0.0.0.0/tcp/4051): ingest signed announcements, "
                   "fetch and seed their blocks. Off by default.")
@click.option("--bootstrap", multiple=True,
              help="libp2p peer to dial on start, /ip4/.../tcp/.../p2p/12D3KooW... "
                   "(repeat; needs --p2p-listen).")
@click.option("--trust-proxy", "proxies", multiple=True,
              help="Address of a reverse proxy whose X-Forwarded-For is believed (repeat). Without it the "
                   "header is ignored, so no client can pick the address its writes are rate-limited under.")
def serve_command(host: str, port: int, db_url: str | None, trusted_keys: str | None,
                  p2p_listen: tuple[str, ...], bootstrap: tuple[str, ...], proxies: tuple[str, ...]) -> None:
    """Serve the index at http://HOST:PORT/ (API docs at /docs; with --p2p-listen, counts at /api/p2p)."""
    from pathlib import Path

    import uvicorn

    from commons.flower import ensure_free
    from index.app import create_app
    from index.db import IndexDB
    from index.routing import Routes
    from protocol.content.blockstore import BlockStore
    from protocol.signing.keys import Identity
    from protocol.signing.trust import TRUSTED_KEYS, read_key_list, trust_dir

    ensure_free(host, port)  # before the database and the p2p host: one line naming --port, not a traceback
    keys = read_key_list(Path(trusted_keys) if trusted_keys else trust_dir() / TRUSTED_KEYS)
    try:
        db = IndexDB(db_url, trusted_keys=keys)
    except CommonsError:
        raise
    except Exception as exc:  # noqa: BLE001 - driver errors are long; the user needs the URL and the reason
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CommonsError(f"cannot open the index database {db_url or 'default'} ({reason}); "
                           "check --db") from None
    if bootstrap and not p2p_listen:
        raise CommonsError("--bootstrap needs --p2p-listen MULTIADDR (e.g. /ip4/0.0.0.0/tcp/4051)")
    store = BlockStore()
    identity = Identity.load_or_create()  # names the gateway in /routing/v1, and the libp2p host
    routes = Routes()
    app = create_app(db, store, routes=routes, peer_id=identity.peer_id())
    if p2p_listen:
        from index.gossip import IndexPeer, p2p_router

        peer = IndexPeer(db, store, identity, p2p_listen, bootstrap, routes)
        node = peer.start()
        app.include_router(p2p_router(peer.ingestor))
        warn_unreached(node.bootstrap_errors)
        click.echo(f"libp2p peer {node.peer_id}; announce to / bootstrap from: "
                   f"{' '.join(node.dialable_addrs)}",
                   err=True)
    click.echo(f"index at http://{host}:{port}/  (API docs /docs, database {db.url.split('@')[-1]})",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=bool(proxies),
                forwarded_allow_ips=",".join(proxies) or None)


commands = [index_group]
