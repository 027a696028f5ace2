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

from commons.cli.output import emit, warn_unreached
from protocol.errors import CommonsError


@click.group("node")
def node_group() -> None:
    """Volunteer your machine to a campaign."""


@node_group.command("start")
@click.option("--coordinator", required=True, help="The coordinator's SuperLink address HOST:PORT.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
              help="Your local training data, chat `messages` JSONL (default "
                   "$COMMONS_HOME/data/train.jsonl).")
@click.option("--max-cpu-threads", type=click.IntRange(1, 1024), help="Use at most this many CPU threads.")
@click.option("--max-vram", type=float, help="Report at most this many GB of GPU memory to the shard plan.")
@click.option("--hours", type=float, help="Stop after this many hours.")
@click.option("--idle-only", is_flag=True,
              help="Pause training while other programs keep the CPU busy or the laptop runs on battery.")
@click.option("--insecure/--tls", default=True, show_default=True,
              help="Plain HTTP to the coordinator (loopback/LAN); --tls needs --ca.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A closed campaign's ca.pem (from the coordinator admin): TLS, and sign in with `commons "
                   "node key`.")
@click.option("--seed", is_flag=True,
              help="Also run a libp2p host that seeds your block store and announces presence.")
@click.option("--p2p-listen", multiple=True, default=["/ip4/0.0.0.0/tcp/4051"], show_default=True,
              help="Where the --seed host listens.")
@click.option("--bootstrap", multiple=True,
              help="libp2p peer for --seed to dial (repeat; default: config `peers`).")
@click.option("--reserve", multiple=True, metavar="RELAY",
              help="Behind a NAT: seed through this relay's multiaddr, e.g. the index's "
                   "/ip4/.../p2p/12D3KooW... (repeat; docs/p2p.md, 'Behind a NAT').")
def start_command(coordinator: str, data: Path | None, max_cpu_threads: int | None, max_vram: float | None,
                  hours: float | None, idle_only: bool, insecure: bool, ca: Path | None, seed: bool,
                  p2p_listen: tuple[str, ...], bootstrap: tuple[str, ...], reserve: tuple[str, ...]) -> None:
    """Connect to COORDINATOR and train whenever it sends work; reconnects if it restarts."""
    from commons.flower import Network
    from protocol.data.records import read_records
    from protocol.home import home, sub
    from protocol.signing.keys import Identity

    coordinator = _coordinator_address(coordinator)
    auth_key = _closed_campaign_key(insecure, ca)
    root = home()
    if data is not None:
        read_records(data)  # a bad line is the volunteer's to fix now, not a traceback mid-round
    data = data or root / "data" / "train.jsonl"
    if not data.is_file():
        click.echo(f"note: no local data at {data}; this node can only join campaigns that ship their own "
                   "datasets (data = \"campaign\"); pass --data FILE.jsonl to train on yours", err=True)
    identity = Identity.load_or_create()
    sub("logs")
    # started: the volunteer's join time runs from here to its first update (status line, coordinator)
    node_config = {"home": str(root), "data": str(data.resolve()), "started": round(time.time(), 3)}
    if max_cpu_threads:
        node_config["threads"] = max_cpu_threads
    if max_vram:
        node_config["max_vram"] = max_vram
    if idle_only:
        node_config["idle_only"] = True
    if reserve and not seed:
        raise CommonsError("--reserve RELAY is for the seeding host: add --seed")
    lock = _one_daemon_per_home(sub("node"), root)
    seeder = _start_seeding(p2p_listen, bootstrap, reserve) if seed else None
    net = Network(sub("node"), ca=ca.resolve() if ca else None)
    log = net.workdir / "logs" / "supernode.log"
    deadline = time.monotonic() + hours * 3600 if hours else None
    env = {"COMMONS_HOME": str(root)}
    # one runner for the daemon's life: it runs only the installed node code and keeps the model loaded
    # across coordinator restarts (each restart needs a fresh SuperNode, not a fresh model)
    (root / "status.json").unlink(missing_ok=True)  # the status line shows this run, not the last one
    runtime = net.runtime("supernode")
    runner = net.start_runner("runner", runtime, root, env)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`/systemd stop: clean up like Ctrl-C
    click.echo(f"volunteer {identity.public_hex[:16]}…: waiting for the coordinator at {coordinator}; logs "
               f"in {root / 'logs'} and {net.workdir / 'logs'}", err=True)
    try:
        for attempt in itertools.count():
            log_start = log.stat().st_size if log.exists() else 0  # the log is appended to across runs
            proc = net.start_supernode("supernode", coordinator, node_config, env=env, insecure=insecure,
                                       auth_key=auth_key, runtime=runtime)
            started = time.monotonic()
            while proc.poll() is None and (deadline is None or time.monotonic() < deadline):
                runner = _keep_running(net, runner, runtime, root, env)
                _status_line(root / "status.json", log, coordinator, ca is not None)
                time.sleep(1)
            if proc.poll() is None:  # --hours is up
                break
            _explain_exit(log, log_start, coordinator)  # a refusal will not heal by retrying
            # Flower's SuperNode exits when the SuperLink it registered with goes away (a coordinator restart
            # forgets its nodes): start a fresh one, backing off while the coordinator stays down
            wait = 2.0 if time.monotonic() - started > 60 else min(30.0, 2.0 * 2 ** min(attempt, 4))
            net.procs.remove(proc)
            # systemd's stop and a shutdown signal every process of the volunteer at once: when the
            # SuperNode's exit was that, our own SIGTERM arrives within this second and this is a stop
            time.sleep(1.0)
            click.echo(f"\nlost the coordinator {coordinator} (SuperNode exit code {proc.returncode}, log "
                       f"{log}); reconnecting in {wait:.0f}s", err=True)
            time.sleep(wait - 1.0)
    except KeyboardInterrupt:
        pass
    finally:
        net.close()
        if seeder is not None:
            seeder.stop()
        lock.close()
        click.echo(f"\nvolunteer stopped; `commons node start --coordinator {coordinator}` joins again",
                   err=True)


def _one_daemon_per_home(folder: Path, root: Path):
    """Two daemons on one home would be one volunteer key twice, each with its own runner and model."""
    import fcntl

    handle = (folder / "daemon.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise CommonsError(f"a volunteer already runs from {root}: stop it first, or give this one its own "
                           "COMMONS_HOME") from None
    return handle


def _coordinator_address(text: str) -> str:
    """HOST:PORT as Flower dials it; a URL or a bare host gets a one-line fix instead of endless retries."""
    if "://" in text:
        bare = text.split("://", 1)[1].rstrip("/")
        raise CommonsError(f"--coordinator takes HOST:PORT without a scheme: use --coordinator {bare}")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommonsError(f"--coordinator {text!r} needs HOST:PORT, e.g. 192.0.2.10:9092")
    return text


def _keep_running(net, runner, runtime, root: Path, env: dict[str, str]):
    """The runner holds the model: if it died (out of memory, a crash), start it again; the round in
    flight resumes from its checkpoint when the coordinator re-sends it."""
    if runner.poll() is None:
        return runner
    net.procs.remove(runner)
    click.echo(f"\nthe node's runner exited with code {runner.returncode} (log "
               f"{net.workdir / 'logs' / 'runner.log'}); restarting it", err=True)
    return net.start_runner("runner", runtime, root, env)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _closed_campaign_key(insecure: bool, ca: Path | None) -> Path | None:
    """--ca means TLS and Flower SuperNode auth (this volunteer's key); --tls alone has no root to trust."""
    from node.flower_keys import supernode_key
    from protocol.home import home

    explicit = (click.get_current_context().get_parameter_source("insecure")
                == click.core.ParameterSource.COMMANDLINE)
    if ca is None:
        if not insecure:
            raise CommonsError("--tls needs the coordinator's root certificate: add --ca ca.pem (ask the "
                               "coordinator admin for it)")
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
        raise CommonsError(f"the coordinator {coordinator} refused this volunteer: its key is not "
                           "registered; send the output of `commons node key` to the coordinator admin "
                           "(`commons coordinator admit`)")
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        raise CommonsError(f"the coordinator {coordinator}'s certificate does not match --ca: ask the admin "
                           "for the current ca.pem and dial a name it covers (`commons coordinator start "
                           "--tls-host`)")
    if "WRONG_VERSION_NUMBER" in text:
        raise CommonsError(f"the coordinator {coordinator} speaks plain HTTP (an open campaign): drop --ca")


@node_group.command("key")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def key_command(as_json: bool) -> None:
    """Print this volunteer's Flower public key (created once) to send to a closed campaign's admin."""
    from node.flower_keys import supernode_key
    from protocol.home import home
    from protocol.signing.keys import fingerprint  # the admin's `coordinator admit` prints the same

    private, public = supernode_key(home())
    key = public.read_text().strip()

    def text() -> None:
        click.echo(key)
        click.echo(f"saved in {public} ({fingerprint(key)}): send it to the coordinator admin, who runs "
                   "`commons coordinator admit FILE`", err=True)

    emit(as_json, {"public_key": key, "path": str(public), "fingerprint": fingerprint(key),
                   "private_key": str(private)}, text)


@node_group.command("plan")
@click.option("--model", "model_id", required=True,
              help="A Hugging Face id, an alias (smollm2, tiny) or a folder holding the model's config.json.")
@click.option("--vram", type=click.FloatRange(min=0), help="GB of free GPU memory to plan for (a bf16 card).")
@click.option("--ram", type=click.FloatRange(min=0), help="GB of free RAM to plan CPU training for.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="The campaign's train.batch_size.")
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(1),
              help="The campaign's train.max_length (tokens).")
@click.option("--lora-r", default=8, show_default=True, type=click.IntRange(1), help="The campaign's lora.r.")
@click.option("--quantization", default="auto", show_default=True,
              type=click.Choice(["auto", "none", "nf4", "int8"]), help="The campaign's quantization.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan_command(model_id: str, vram: float | None, ram: float | None, batch_size: int, max_length: int,
                 lora_r: int, quantization: str, as_json: bool) -> None:
    """What a campaign on MODEL needs: quantization, checkpointing, micro-batch and the predicted peak.

    From the model's config.json alone (no weights). Without --vram or --ram it plans for this machine.
    Refuses in one line when nothing fits ("needs 6.1 GB, 4.0 GB free: ...")."""
    from modeling.load import model_config
    from modeling.memory import Device, ModelShape, Workload, plan

    shape = ModelShape.from_config(model_config(model_id), name=model_id)
    if vram is not None:
        device = Device("cuda", vram, bf16=True)
    elif ram is not None:
        device = Device("cpu", ram)
    else:
        from node import hardware

        device = Device.from_capability(hardware.detect())
    work = Workload(batch_size=batch_size, max_length=max_length, lora_r=lora_r)
    chosen = plan(shape, work, device, quantization)

    def text() -> None:
        where = "a GPU" if device.kind == "cuda" else f"{device.kind.upper()} RAM"
        size = f"{shape.params() / 1e9:.2f}B" if shape.params() >= 1e9 else f"{shape.params() / 1e6:.0f}M"
        click.echo(f"{model_id} ({size} parameters) on {where} with {device.free_gb:.1f} GB free "
                   f"({chosen.usable_gb:.1f} after the safety margin), batch {batch_size} × {max_length} "
                   f"tokens, LoRA r {lora_r}:")
        parts = ", ".join(f"{k} {v:.2f}" for k, v in chosen.parts_gb.items())
        checkpointing = str(chosen.gradient_checkpointing).lower()
        rows = [("quantization", chosen.quantization), ("gradient_checkpointing", checkpointing),
                ("micro_batch", chosen.micro_batch), ("accumulation", chosen.accumulation),
                ("predicted_peak_gb", f"{chosen.predicted_peak_gb:.2f}  ({parts})")]
        for name, value in rows:
            click.echo(f"  {name:24}{value}")

    emit(as_json, {"model": model_id, "params": shape.params(), "device": device.kind,
                   "free_gb": device.free_gb, **chosen.to_json()}, text, sort_keys=True)


def _start_seeding(listen: tuple[str, ...], bootstrap: tuple[str, ...], reserve: tuple[str, ...] = ()):
    """A background libp2p host (its own thread): seeds the block store, announces presence as "train";
    behind a NAT, reachable through the relays in `reserve`."""
    from commons import config
    from protocol.content.blockstore import BlockStore
    from protocol.p2p.background import Background
    from protocol.p2p.host import dialable
    from protocol.p2p.service import serve

    peers = list(bootstrap) or config.load()["peers"]
    seeder = Background(lambda ready: serve(BlockStore(), (), list(listen), None, peers, on_ready=ready,
                                            capability="train", reserve=list(reserve)), name="node-p2p")
    info = seeder.start()
    warn_unreached(info["bootstrap_errors"], info["relay_errors"])
    addrs = dialable(info["addrs"]) + info["circuit_addrs"]
    click.echo(f"seeding as libp2p peer {info['peer_id']} on {' '.join(addrs)}", err=True)
    return seeder


def status_text(st: dict | None, log_tail: str, coordinator: str, closed: bool) -> str:
    """The live status line from the worker's status.json and the end of the SuperNode's log."""
    if st is None:
        last = log_tail.rstrip().splitlines()[-1:]
        if last and "Connection attempt failed" in last[0]:
            hint = "" if closed else "; if it runs a closed campaign, pass --ca ca.pem"
            return f"cannot reach the coordinator {coordinator}, retrying{hint}"
        return "waiting for work"
    if st.get("state") == "refused":
        return str(st.get("reason"))
    if st.get("state") == "failed":
        return f"round {st.get('round')} failed: {st.get('reason')}"
    if st.get("state") == "paused":
        return f"round {st.get('round')} paused: {st.get('reason')} (--idle-only)"
    if st.get("state") == "ended":
        return f"campaign {st.get('campaign')} ended: {st.get('outcome')}; waiting for the next campaign"
    if st.get("state") == "training":
        return (f"round {st['round']} step {st['step']}/{st['steps']} loss {st['loss']:.3f} "
                f"{st['tokens_per_s']:.0f} tokens/s")
    loss = f", loss {st['loss']:.3f}" if isinstance(st.get("loss"), (int, float)) else ""
    joined = f" (joined: first update {st['joined_s']:.0f} s after start)" if st.get("joined_s") else ""
    return f"round {st.get('round')} sent{loss}; waiting for the next round{joined}"


_LAST = {"line": "", "at": 0.0}  # what a log file (not a terminal) was last told, and when


def _status_line(path: Path, log: Path, coordinator: str, closed: bool) -> None:
    """A terminal's live line; into a log file, a timestamped line when the state changes (at most every 30 s
    while training, so a long round never looks hung)."""
    try:
        st = json.loads(path.read_text())
    except (OSError, ValueError):
        st = None
    line = status_text(st, _tail(log), coordinator, closed)
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line[: os.get_terminal_size(2).columns - 1].ljust(60))
        sys.stderr.flush()
        return
    state = line.split(" step ")[0]  # "round 2 step 3/8 …": a new step alone is no new state
    if (state != _LAST["line"].split(" step ")[0]
            or (line != _LAST["line"] and time.time() - _LAST["at"] >= 30)):
        click.echo(f"{time.strftime('%H:%M:%S')} {line}", err=True)
        _LAST.update(line=line, at=time.time())


def _tail(path: Path, size: int = 400) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


commands = [node_group]
