"""`commons node start`: join a campaign as a volunteer (a Flower SuperNode) with a live status line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from protocol.errors import CommonsError


@click.group("node")
def node_group() -> None:
    """Volunteer your machine to a campaign."""


@node_group.command("start")
@click.option("--coordinator", required=True, help="The coordinator's SuperLink address HOST:PORT.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
              help="Your local training data, chat `messages` JSONL (default $COMMONS_HOME/data/train.jsonl).")
@click.option("--max-cpu-threads", type=click.IntRange(1, 1024), help="Use at most this many CPU threads.")
@click.option("--max-vram", type=float, help="Report at most this many GB of GPU memory to the shard plan.")
@click.option("--hours", type=float, help="Stop after this many hours.")
@click.option("--insecure/--tls", default=True, show_default=True, help="Plain HTTP to the coordinator (loopback/LAN).")
@click.option("--seed", is_flag=True, help="Also run a libp2p host that seeds your block store and announces presence.")
@click.option("--p2p-listen", multiple=True, default=["/ip4/0.0.0.0/tcp/4051"], show_default=True,
              help="Where the --seed host listens.")
@click.option("--bootstrap", multiple=True, help="libp2p peer for --seed to dial (repeat; default: config `peers`).")
def start_command(coordinator: str, data: Path | None, max_cpu_threads: int | None, max_vram: float | None,
                  hours: float | None, insecure: bool, seed: bool, p2p_listen: tuple[str, ...],
                  bootstrap: tuple[str, ...]) -> None:
    """Connect to COORDINATOR and train whenever it sends work; reconnects if it restarts."""
    from commons.flower import Network
    from protocol.home import home, sub
    from protocol.keys import Identity

    if ":" not in coordinator:
        raise CommonsError(f"--coordinator {coordinator!r} needs HOST:PORT, e.g. 192.0.2.10:9092")
    root = home()
    data = data or root / "data" / "train.jsonl"
    if not data.is_file():
        raise CommonsError(f"no training data at {data}: pass --data FILE.jsonl (chat `messages` records)")
    identity = Identity.load_or_create()
    sub("logs")
    node_config = {"home": str(root), "data": str(data.resolve())}
    if max_cpu_threads:
        node_config["threads"] = max_cpu_threads
    seeder = _start_seeding(p2p_listen, bootstrap) if seed else None
    net = Network(sub("node"))
    proc = net.start_supernode("supernode", coordinator, node_config, env={"COMMONS_HOME": str(root)}, insecure=insecure)
    click.echo(f"volunteer {identity.public_hex[:16]}… connected to {coordinator}; logs in {root / 'logs'}", err=True)
    deadline = time.monotonic() + hours * 3600 if hours else None
    try:
        while proc.poll() is None and (deadline is None or time.monotonic() < deadline):
            _status_line(root / "status.json")
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        net.close()
        if seeder is not None:
            seeder.stop()
        sys.stderr.write("\n")
    if proc.returncode not in (None, 0, -15):
        raise CommonsError(f"the SuperNode stopped with code {proc.returncode}; see {net.workdir / 'logs'}")


def _start_seeding(listen: tuple[str, ...], bootstrap: tuple[str, ...]):
    """A background libp2p host (its own thread): seeds the block store, announces presence as "train"."""
    from commons import config
    from protocol.blockstore import BlockStore
    from protocol.p2p.background import Background
    from protocol.p2p.host import dialable
    from protocol.p2p.service import serve

    peers = list(bootstrap) or config.load()["peers"]
    seeder = Background(lambda ready: serve(BlockStore(), (), list(listen), None, peers, on_ready=ready,
                                            capability="train"), name="node-p2p")
    info = seeder.start()
    for addr, why in info["bootstrap_errors"].items():
        click.echo(f"warning: bootstrap peer {addr} unreachable: {why}", err=True)
    click.echo(f"seeding as libp2p peer {info['peer_id']} on {' '.join(dialable(info['addrs']))}", err=True)
    return seeder


def _status_line(path: Path) -> None:
    try:
        st = json.loads(path.read_text())
    except (OSError, ValueError):
        line = "waiting for work"
    else:
        if st.get("state") == "training":
            line = f"round {st['round']} step {st['step']}/{st['steps']} loss {st['loss']:.3f} {st['tokens_per_s']:.0f} tokens/s"
        else:
            line = f"round {st.get('round')} sent, loss {st.get('loss')}; waiting for the next round"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line[: os.get_terminal_size(2).columns - 1].ljust(60))
        sys.stderr.flush()


commands = [node_group]
