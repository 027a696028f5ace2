"""`commons coordinator start`: run a campaign for real volunteers (SuperLink + ServerApp)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from protocol.errors import CommonsError


@click.group("coordinator")
def coordinator_group() -> None:
    """Run a federated fine-tuning campaign."""


@coordinator_group.command("start")
@click.option("--campaign", "campaign_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The campaign file (TOML).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the SuperLink listens on.")
@click.option("--port", default=9092, show_default=True, type=click.IntRange(1, 65535))
@click.option("--wait-nodes", type=click.IntRange(0, 10000), default=0, show_default=True,
              help="Submit the campaign only once this many volunteers are connected (0: at once).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
def start_command(campaign_file: Path, host: str, port: int, wait_nodes: int, as_json: bool) -> None:
    """Start the SuperLink, run the campaign, publish the signed adapter to the local index."""
    from commons.demo import _follow, _register
    from commons.flower import Network
    from coordinator import campaign as campaigns
    from protocol.home import home, sub
    from protocol.keys import Identity
    from protocol.models import cache_dir

    campaign = campaigns.load(campaign_file)  # fail fast, before any process starts
    root = home()
    identity = Identity.load_or_create()
    net = Network(sub("coordinator"))
    try:
        net.start_superlink(host=host, port=port, env={"COMMONS_HOME": str(root), "COMMONS_CACHE": str(cache_dir())})
        click.echo(f"coordinator {identity.public_hex[:16]}…: volunteers run `commons node start --coordinator HOST:{port}`", err=True)
        if wait_nodes:
            _wait_for_volunteers(net, wait_nodes, campaign.node_wait)
        run_id = net.submit({"campaign": str(campaign.source), "home": str(root)})
        click.echo(f"campaign {campaign.name} is Flower run {run_id}; waiting for {campaign.min_nodes} volunteers", err=True)
        final = _follow(root / "campaigns" / campaign.name / "events.jsonl", [], campaign.rounds, not as_json,
                        timeout=campaign.node_wait + campaign.rounds * campaign.round_timeout + 600, work=net.workdir)
    finally:
        net.close()
    if final["event"] == "error":
        raise CommonsError(f"the campaign failed: {final['message']}")
    result = json.loads((root / "campaigns" / campaign.name / "result.json").read_text())
    summary = _register(result, len(result["contributors"]), campaign.rounds)
    summary.pop("samples", None)
    click.echo(json.dumps(summary) if as_json else f"{campaign.name}: base {summary['accuracy_base']:.1%} → adapter "
               f"{summary['accuracy_adapter']:.1%}; {summary.get('adapter_cid') or summary.get('reason')}")


def _wait_for_volunteers(net, want: int, timeout: float) -> None:
    """Poll the SuperLink's Control API until `want` SuperNodes are online, so round 1 includes them all."""
    import subprocess
    import time

    from commons.flower import _bin, _env

    deadline, have = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        done = subprocess.run([_bin("flwr"), "supernode", "list", "--format", "json"], capture_output=True, text=True,
                              timeout=60, check=False, cwd=net.workdir, env=_env({"FLWR_HOME": str(net.flwr_home())}))
        try:
            have = sum(n.get("status") == "online" for n in json.loads(done.stdout).get("nodes", []))
        except (json.JSONDecodeError, AttributeError):
            have = 0
        if have >= want:
            return
        time.sleep(1.0)
    raise CommonsError(f"only {have} of {want} volunteers connected within {timeout:.0f}s: start more nodes or "
                       "lower --wait-nodes")


commands = [coordinator_group]
