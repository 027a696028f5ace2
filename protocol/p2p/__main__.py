"""`python -m protocol.p2p serve|pull`: a seeding peer and a puller, as plain processes.

    $ python -m protocol.p2p serve --store /tmp/a --add model/ --listen /ip4/0.0.0.0/tcp/4051
    {"peer_id": "12D3KooW...", "addrs": [...], "roots": ["Qm..."]}        # first line; then serves
    $ python -m protocol.p2p pull Qm... --store /tmp/b --peer /ip4/.../p2p/12D3KooW... --out copy/
    $ python -m protocol.p2p pull bafy... --peer /ip4/.../p2p/12D3KooW...     # from Kubo or Helia too
    $ python -m protocol.p2p serve --relay                                # public: relay for NATed seeders
    $ python -m protocol.p2p serve --add model/ --reserve /ip4/RELAY/tcp/4051/p2p/12D3KooW...  # behind NAT

(`commons p2p ...` is the same with click; this entry point needs nothing but the protocol package.)
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import trio

from protocol.content.blockstore import BlockStore
from protocol.errors import CommonsError
from protocol.p2p.host import DEFAULT_PORT
from protocol.p2p.service import pull, serve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m protocol.p2p", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="seed a store's blocks over bitswap (add paths first)")
    s.add_argument("--store", type=Path, default=None, help="block store folder (default ~/.commons/blocks)")
    s.add_argument("--add", type=Path, action="append", default=[], help="file or folder to add and seed")
    s.add_argument("--listen", action="append", default=None, help=f"multiaddr (default tcp/{DEFAULT_PORT})")
    s.add_argument("--key", type=Path, default=None, help="ed25519 key file (default: the node identity)")
    s.add_argument("--bootstrap", action="append", default=[], help="peer multiaddr to dial on start")
    s.add_argument("--rate-limit", type=float, default=None, help="cap on bytes/s served (default: none)")
    s.add_argument("--relay", action="store_true", help="relay for peers behind NATs (circuit relay v2)")
    s.add_argument("--reserve", action="append", default=[], metavar="RELAY",
                   help="behind a NAT: be reachable through this relay's multiaddr (repeat)")
    s.add_argument("--hole-punch", action="store_true",
                   help="with --reserve: try to turn relayed connections into direct ones (DCUtR)")
    p = sub.add_parser("pull", help="fetch a DAG from peers into a store, optionally export it")
    p.add_argument("root")
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--peer", action="append", required=True, help="peer multiaddr with /p2p/ID (repeat)")
    p.add_argument("--out", type=Path, default=None, help="write the file/folder here")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        store = BlockStore(args.store)
        if args.command == "serve":
            listen = args.listen or [f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"]
            trio.run(partial(serve, store, args.add, listen, args.key, args.bootstrap, args.rate_limit,
                             _print_ready, relay=args.relay, reserve=args.reserve,
                             hole_punch=args.hole_punch))
        else:
            report = pull(args.root, store, args.peer, out=args.out, progress=not args.no_progress)
            print(json.dumps(report), flush=True)
    except CommonsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _print_ready(info: dict) -> None:
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    sys.exit(main())
