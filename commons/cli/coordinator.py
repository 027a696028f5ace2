"""`commons coordinator start`: run a campaign for real volunteers (SuperLink + ServerApp)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from commons.addresses import listen_addresses
from commons.cli.output import emit
from protocol.errors import CommonsError


@click.group("coordinator")
def coordinator_group() -> None:
    """Run a federated fine-tuning campaign."""


@coordinator_group.command("start")
@click.option("--campaign", "campaign_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The campaign file (TOML).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the SuperLink listens on.")
@click.option("--port", default=9092, show_default=True, type=click.IntRange(1, 65535),
              help="Port volunteers dial; refused if something already listens there.")
@click.option("--restart", is_flag=True,
              help="Start the campaign over from round 1, setting its last run aside (default: resume after "
                   "its last saved round; a finished campaign needs --restart).")
@click.option("--wait-nodes", type=click.IntRange(0, 10000), default=0, show_default=True,
              help="Submit the campaign only once this many volunteers are connected (0: at once).")
@click.option("--closed", is_flag=True,
              help="Only registered volunteers may join (TLS + Flower SuperNode authentication).")
@click.option("--volunteers", type=click.Path(exists=True, path_type=Path),
              help="Closed campaign: file with one volunteer public key per line (`#` comments), or a "
                   "directory of *.pub. Implies --closed.")
@click.option("--tls-host", multiple=True,
              help="Closed campaign: a name or IP volunteers dial (repeat). Always added: --host unless "
                   "0.0.0.0, 127.0.0.1, localhost.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
def start_command(campaign_file: Path, host: str, port: int, restart: bool, wait_nodes: int, closed: bool,
                  volunteers: Path | None, tls_host: tuple[str, ...], as_json: bool) -> None:
    """Start the SuperLink, run the campaign, publish the signed adapter to the local index.

    Started again under the same name, a campaign resumes after its last saved round (--restart: from
    round 1); Ctrl-C and SIGTERM stop every process it started."""
    from commons.demo import _follow, _register, follow_index
    from commons.flower import Network
    from coordinator import campaign as campaigns
    from coordinator import closed as closing
    from coordinator import restart as restarts
    from modeling.load import cache_dir
    from protocol.home import home, sub
    from protocol.signing.keys import Identity

    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `timeout`, systemd: stop cleanly, as on Ctrl-C
    campaign = campaigns.load(campaign_file)  # fail fast, before any process starts
    folder = home() / "campaigns" / campaign.name
    said = restarts.decide(restarts.previous_run(folder, campaign), campaign.name, restart)
    volunteers = volunteers or (Path(campaign.volunteers) if campaign.volunteers else None)  # the flag wins
    closed = closed or campaign.closed or volunteers is not None
    if tls_host and not closed:
        raise CommonsError("--tls-host only applies to closed campaigns: "
                           "add --closed (and --volunteers FILE)")
    keys = closing.read_volunteers(volunteers) if volunteers else []
    for line in [said, *_licence_warnings(campaign)]:  # every mistake above is refused before this is said
        if line:
            click.echo(line, err=True)
    if restart:
        restarts.set_aside(folder)
    root = home()
    identity = Identity.load_or_create()
    follow_index(campaign.name)  # the ServerApp takes its next version from this home's record
    work = sub("coordinator")
    tls = None
    if closed:
        tls, done = closing.ensure_tls(work / "tls", closing.tls_hosts(host, tls_host))
        keys = list(dict.fromkeys([*keys, *closing.admitted(work / ADMITTED)]))
    net = Network(work, ca=tls.ca if tls else None)
    try:
        net.start_superlink(host=host, port=port,
                            env={"COMMONS_HOME": str(root), "COMMONS_CACHE": str(cache_dir())},
                            tls=tls)
        _write_running(work, net, tls)
        if tls:
            _register_all(net, keys)
            dial = closing.tls_hosts(host, tls_host)[0]  # a name its certificate covers
            click.echo(f"closed campaign ({done} TLS, {len(keys)} volunteers registered): volunteers copy "
                       f"{tls.ca} and run `commons node start --coordinator {dial}:{port} --ca ca.pem`; "
                       "admit more with `commons coordinator admit KEY.pub`", err=True)
        else:
            addresses = listen_addresses(host)
            others = f" (this machine also answers on {', '.join(addresses[1:])})" if addresses[1:] else ""
            click.echo(f"coordinator {identity.public_hex[:16]}…: volunteers run `commons node start "
                       f"--coordinator {addresses[0]}:{port}`{others}", err=True)
        if wait_nodes:
            _wait_for_volunteers(net, wait_nodes, campaign.node_wait)
        events = folder / "events.jsonl"
        offset = events.stat().st_size if events.exists() else 0  # this run's events start here
        run_id = net.submit({"campaign": str(campaign.source), "home": str(root)})
        click.echo(f"campaign {campaign.name} is Flower run {run_id}; rounds start once {campaign.min_nodes} "
                   f"volunteer{'s' * (campaign.min_nodes != 1)} can train (patience "
                   f"{campaign.node_wait:.0f}s)", err=True)
        final = _follow(events, [], campaign.rounds, not as_json, work=net.workdir, offset=offset, demo=False,
                        timeout=campaign.node_wait + 2 * campaign.round_timeout + 600)
    except KeyboardInterrupt:
        click.echo(f"\nstopping campaign {campaign.name}: its SuperLink, superexec and ServerApp; the same "
                   "command resumes it after its last saved round", err=True)
        raise
    finally:
        (work / RUNNING).unlink(missing_ok=True)
        net.close()  # with superexec and the ServerApp below it
    if final["event"] == "error":
        raise CommonsError(f"the campaign failed: {final['message']}")
    result = json.loads((folder / "result.json").read_text())
    summary = _register(result, len(result["contributors"]), campaign.rounds)
    summary.pop("samples", None)
    summary.update(published_round=result.get("published_round"), license=result.get("license"))
    emit(as_json, summary, lambda: click.echo("\n".join(finale(summary, result))))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _licence_warnings(campaign) -> list[str]:
    """Said before anything runs: the licence nobody chose, and datasets whose licence it may break."""
    from index.licenses import conflicts

    unnamed = (f"warning: the campaign file names no license: the adapter will be published under "
               f"{campaign.published_license()}; add license = \"SPDX-ID\" to {campaign.source} to choose")
    lines = [] if campaign.license else [unnamed]
    return lines + [f"warning: {why}" for why in conflicts(campaign.published_license(), campaign.datasets)]


def finale(summary: dict, result: dict) -> list[str]:
    """The campaign's last words: the scores, what was published, and how others serve and pull it."""
    from urllib.parse import urlparse

    from commons import config
    from protocol.home import home

    name = summary["name"]
    head = f"{name}: base {summary['accuracy_base']:.1%} → adapter {summary['accuracy_adapter']:.1%}"
    if not summary["published"]:
        return [f"{head}; {summary.get('reason')}"]
    port = urlparse(config.load()["index_url"]).port or 8765
    index = f"http://{listen_addresses('0.0.0.0')[0]}:{port}"  # what other machines dial once it is served
    return [
        f"{head} ({result.get('published_because') or 'the last round'}; licence {result.get('license')})",
        f"published {name} v{summary['version']} {summary['adapter_cid']}",
        (f"serve it: COMMONS_HOME={home()} commons index serve --host 0.0.0.0 --port {port}   (its page: "
         f"{index}/adapters/{name})"),
        f"pull it:  commons pull {name} --index {index}   (on this machine: commons pull {name})",
    ]


RUNNING = "running.json"  # written while a coordinator runs: `admit` finds its SuperLink through it
ADMITTED = "admitted"  # keys `admit` added: registered again when the coordinator restarts


def _write_running(work: Path, net, tls) -> None:
    import os

    info = {"pid": os.getpid(), "address": net.address, "closed": tls is not None,
            "flwr_home": str(net.flwr_home()), "ca": str(tls.ca) if tls else None}
    (work / RUNNING).write_text(json.dumps(info))


def _register_all(net, keys: list[str]) -> list[int]:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from commons.flower import _bin, _env
    from coordinator import closed as closing

    folder, flwr_home, env = net.workdir / "keys", net.flwr_home(), _env({})
    files = [closing.key_file(folder, key) for key in keys]
    # each `flwr supernode register` is a few seconds of CLI start-up: a long volunteer list runs 8 at a time
    with ThreadPoolExecutor(max_workers=8) as pool:
        done = pool.map(lambda f: closing.register(_bin("flwr"), flwr_home, f, env), files)
        return list(tqdm(done, total=len(files), desc="registering volunteers", unit="key", file=sys.stderr,
                         disable=None if len(files) > 1 else True))


def _running_coordinator(work: Path) -> dict:
    import os

    try:
        info = json.loads((work / RUNNING).read_text())
        os.kill(info["pid"], 0)
    except (OSError, ValueError, KeyError):
        raise CommonsError(f"no coordinator is running under {work.parent}: start one with `commons "
                           "coordinator start --closed --campaign FILE` (same COMMONS_HOME) first") from None
    if not info.get("closed"):
        raise CommonsError("the running coordinator is open (anyone may join): restart it with --closed to "
                           "admit volunteers by key")
    return info


@coordinator_group.command("admit")
@click.argument("key_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def admit_command(key_file: Path, as_json: bool) -> None:
    """Register one more volunteer (KEY_FILE: the line `commons node key` printed) with the running closed
    campaign; the key is registered again whenever the coordinator restarts."""
    from commons.flower import _bin, _env
    from coordinator import closed as closing
    from protocol.home import sub

    try:
        text = key_file.read_text(errors="replace")
    except OSError:
        raise CommonsError(f"cannot read {key_file}: "
                           "pass the file holding the volunteer's public key") from None
    from protocol.signing.keys import fingerprint

    key = closing.parse_public_key(text, str(key_file))
    work = sub("coordinator")
    info = _running_coordinator(work)
    node_id = closing.register(_bin("flwr"), Path(info["flwr_home"]), closing.key_file(work / "keys", key),
                               _env({}))
    closing.key_file(work / ADMITTED, key)
    reply = {"node_id": node_id, "fingerprint": fingerprint(key), "coordinator": info["address"]}
    emit(as_json, reply, f"admitted {reply['fingerprint']} as SuperNode {node_id} on {info['address']}")


def _wait_for_volunteers(net, want: int, timeout: float) -> None:
    """Poll the SuperLink's Control API until `want` SuperNodes are online, so round 1 includes them all."""
    import subprocess
    import time

    from commons.flower import _bin, _env

    deadline, have = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        done = subprocess.run([_bin("flwr"), "supernode", "list", "--format", "json"], capture_output=True,
                              text=True, timeout=60, check=False, cwd=net.workdir,
                              env=_env({"FLWR_HOME": str(net.flwr_home())}))
        try:
            have = sum(n.get("status") == "online" for n in json.loads(done.stdout).get("nodes", []))
        except (json.JSONDecodeError, AttributeError):
            have = 0
        if have >= want:
            return
        time.sleep(1.0)
    raise CommonsError(f"only {have} of {want} volunteers connected within {timeout:.0f}s: start more nodes "
                       "or lower --wait-nodes")


commands = [coordinator_group]
