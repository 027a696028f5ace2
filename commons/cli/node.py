"""`commons node start`: join a campaign as a volunteer (a Flower SuperNode) with a live status line."""

from __future__ import annotations

import itertools
import json
import os
import signal
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
@click.option("--idle-only", is_flag=True,
              help="Pause training while other programs keep the CPU busy or the laptop runs on battery.")
@click.option("--insecure/--tls", default=True, show_default=True,
              help="Plain HTTP to the coordinator (loopback/LAN); --tls needs --ca.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A closed campaign's ca.pem (from the coordinator admin): TLS, and sign in with `commons node key`.")
@click.option("--seed", is_flag=True, help="Also run a libp2p host that seeds your block store and announces presence.")
@click.option("--p2p-listen", multiple=True, default=["/ip4/0.0.0.0/tcp/4051"], show_default=True,
              help="Where the --seed host listens.")
@click.option("--bootstrap", multiple=True, help="libp2p peer for --seed to dial (repeat; default: config `peers`).")
def start_command(coordinator: str, data: Path | None, max_cpu_threads: int | None, max_vram: float | None,
                  hours: float | None, idle_only: bool, insecure: bool, ca: Path | None, seed: bool, p2p_listen: tuple[str, ...],
                  bootstrap: tuple[str, ...]) -> None:
    """Connect to COORDINATOR and train whenever it sends work; reconnects if it restarts."""
    from commons.flower import Network
    from protocol.home import home, sub
    from protocol.keys import Identity

    if ":" not in coordinator:
        raise CommonsError(f"--coordinator {coordinator!r} needs HOST:PORT, e.g. 192.0.2.10:9092")
    auth_key = _closed_campaign_key(insecure, ca)
    root = home()
    if data is not None and not data.is_file():
        raise CommonsError(f"no training data at {data}: pass --data FILE.jsonl (chat `messages` records)")
    data = data or root / "data" / "train.jsonl"
    if not data.is_file():
        click.echo(f"note: no local data at {data}; this node can only join campaigns that ship their own "
                   "datasets (data = \"campaign\"); pass --data FILE.jsonl to train on yours", err=True)
    identity = Identity.load_or_create()
    sub("logs")
    node_config = {"home": str(root), "data": str(data.resolve())}
    if max_cpu_threads:
        node_config["threads"] = max_cpu_threads
    if max_vram:
        node_config["max_vram"] = max_vram
    if idle_only:
        node_config["idle_only"] = True
    seeder = _start_seeding(p2p_listen, bootstrap) if seed else None
    net = Network(sub("node"), ca=ca.resolve() if ca else None)
    log = net.workdir / "logs" / "supernode.log"
    deadline = time.monotonic() + hours * 3600 if hours else None
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`/systemd stop: clean up like Ctrl-C
    try:
        for attempt in itertools.count():
            log_start = log.stat().st_size if log.exists() else 0  # the log is appended to across runs
            proc = net.start_supernode("supernode", coordinator, node_config, env={"COMMONS_HOME": str(root)},
                                       insecure=insecure, auth_key=auth_key)
            if attempt == 0:
                click.echo(f"volunteer {identity.public_hex[:16]}… connected to {coordinator}; logs in "
                           f"{root / 'logs'}", err=True)
            started = time.monotonic()
            while proc.poll() is None and (deadline is None or time.monotonic() < deadline):
                _status_line(root / "status.json", log, coordinator, ca is not None)
                time.sleep(1)
            if proc.poll() is None:  # --hours is up
                break
            _explain_exit(log, log_start, coordinator)  # a refusal will not heal by retrying
            # Flower's SuperNode exits when the SuperLink it registered with goes away (a coordinator restart
            # forgets its nodes): start a fresh one, backing off while the coordinator stays down
            wait = 2.0 if time.monotonic() - started > 60 else min(30.0, 2.0 * 2 ** min(attempt, 4))
            net.procs.remove(proc)
            click.echo(f"\nlost the coordinator {coordinator} (SuperNode exit code {proc.returncode}, log {log}); "
                       f"reconnecting in {wait:.0f}s", err=True)
            time.sleep(wait)
    except KeyboardInterrupt:
        pass
    finally:
        net.close()
        if seeder is not None:
            seeder.stop()
        sys.stderr.write("\n")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _closed_campaign_key(insecure: bool, ca: Path | None) -> Path | None:
    """--ca means TLS and Flower SuperNode auth (this volunteer's key); --tls alone has no root to trust."""
    from coordinator.closed import supernode_key
    from protocol.home import home

    explicit = click.get_current_context().get_parameter_source("insecure") == click.core.ParameterSource.COMMANDLINE
    if ca is None:
        if not insecure:
            raise CommonsError("--tls needs the coordinator's root certificate: add --ca ca.pem (ask the coordinator "
                               "admin for it)")
        return None
    if insecure and explicit:
        raise CommonsError("--insecure contradicts --ca (a closed campaign is TLS only): drop --insecure")
    return supernode_key(home())[0]


def _explain_exit(log: Path, start: int, coordinator: str) -> None:
    """Turn Flower's log lines for the usual closed-campaign failures into one line naming the fix."""
    try:
        with log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return
    if "code: 2004" in text:  # Flower: "Failed to activate SuperNode": no registered key matches ours
        raise CommonsError(f"the coordinator {coordinator} refused this volunteer: its key is not registered; send "
                           "the output of `commons node key` to the coordinator admin (`commons coordinator admit`)")
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        raise CommonsError(f"the coordinator {coordinator}'s certificate does not match --ca: ask the admin for the "
                           "current ca.pem and dial a name it covers (`commons coordinator start --tls-host`)")
    if "WRONG_VERSION_NUMBER" in text:
        raise CommonsError(f"the coordinator {coordinator} speaks plain HTTP (an open campaign): drop --ca")


@node_group.command("key")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def key_command(as_json: bool) -> None:
    """Print this volunteer's Flower public key (created once) to send to a closed campaign's admin."""
    from coordinator.closed import fingerprint, supernode_key
    from protocol.home import home

    private, public = supernode_key(home())
    key = public.read_text().strip()
    if as_json:
        click.echo(json.dumps({"public_key": key, "path": str(public), "fingerprint": fingerprint(key),
                               "private_key": str(private)}))
        return
    click.echo(key)
    click.echo(f"saved in {public} ({fingerprint(key)}): send it to the coordinator admin, who runs "
               "`commons coordinator admit FILE`", err=True)


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


def status_text(st: dict | None, log_tail: str, coordinator: str, closed: bool) -> str:
    """The live status line from the worker's status.json and the end of the SuperNode's log."""
    if st is None:
        last = log_tail.rstrip().splitlines()[-1:]
        if last and "Connection attempt failed" in last[0]:
            hint = "" if closed else "; if it runs a closed campaign, pass --ca ca.pem"
            return f"cannot reach the coordinator {coordinator}, retrying{hint}"
        return "waiting for work"
    if st.get("state") == "paused":
        return f"round {st.get('round')} paused: {st.get('reason')} (--idle-only)"
    if st.get("state") == "training":
        return (f"round {st['round']} step {st['step']}/{st['steps']} loss {st['loss']:.3f} "
                f"{st['tokens_per_s']:.0f} tokens/s")
    return f"round {st.get('round')} sent, loss {st.get('loss')}; waiting for the next round"


def _status_line(path: Path, log: Path, coordinator: str, closed: bool) -> None:
    if not sys.stderr.isatty():
        return
    try:
        st = json.loads(path.read_text())
    except (OSError, ValueError):
        st = None
    line = status_text(st, _tail(log), coordinator, closed)
    sys.stderr.write("\r" + line[: os.get_terminal_size(2).columns - 1].ljust(60))
    sys.stderr.flush()


def _tail(path: Path, size: int = 400) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


commands = [node_group]
