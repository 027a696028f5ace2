"""`commons demo`: a real federated campaign on this machine, from volunteers to a signed adapter.

It starts a Flower SuperLink and N SuperNodes as separate processes on loopback (the deployment engine),
each volunteer with its own identity and its own slice of the data, runs the campaign, then registers
the signed adapter in the local index.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from commons import config, narrate, timing
from commons.demo_task import write_demo_data
from commons.flower import Network
from coordinator.campaign import Campaign, LoraSpec, TrainSpec, dump
from modeling.load import SMOLLM2_ID, cache_dir, canonical_id, local_path
from protocol.errors import CommonsError
from protocol.home import home
from protocol.signing.keys import Identity


def campaign_for(name: str, model: str, eval_file: Path, nodes: int, rounds: int, steps: int, eval_size: int,
                 datasets: list[dict], **keys: object) -> Campaign:
    """The demo's campaign; `keys` are campaign keys over the defaults (docker/make_campaign.py's)."""
    return Campaign(
        name=name, base_model=canonical_id(model), eval_file=eval_file, license="Apache-2.0", rounds=rounds,
        min_nodes=nodes, round_timeout=900.0, node_wait=180.0, eval_size=eval_size,
        # the campaign defaults (robust rule, 3 trainers per layer, fp32 uploads, volunteers keep their AdamW
        # state, no outer step): docs/federation.md measures them against one machine. With 3 volunteers
        # each trains every layer; `--nodes 6` shows shards.
        task="date normalization to ISO 8601 (YYYY-MM-DD)",
        description="Rewrites dates written in many styles (spelled, abbreviated, numeric) as ISO 8601 "
                    "YYYY-MM-DD.",
        datasets=datasets,
        lora=LoraSpec(r=8, alpha=16), train=TrainSpec(steps=steps, batch_size=8, lr=2e-3, max_length=96),
        **keys,
    )


class Follower:
    """Reads the coordinator's event log and the nodes' status files; drives the progress bar.

    `offset`: where this run's events start (a campaign run again appends to its old log); `demo`: only the
    lines `commons demo` shows, else one line for every event commons/narrate.py knows."""

    def __init__(self, events: Path, node_homes: list[Path], rounds: int, progress: bool, offset: int = 0,
                 demo: bool = True) -> None:
        from tqdm import tqdm

        self.events, self.node_homes, self.offset, self.progress = events, node_homes, offset, progress
        self.demo = demo
        self.seen = time.monotonic()  # when the last event arrived
        # the live bar only on a terminal; the event lines are printed either way
        self.bar = tqdm(total=rounds, desc="rounds", unit="round",
                        disable=not (progress and sys.stderr.isatty()), file=sys.stderr,
                        bar_format="{desc}: {n_fmt}/{total_fmt} |{bar:20}| {elapsed} {postfix}")
        self.last: dict = {}
        self.clock = narrate.RoundClock()

    def poll(self) -> dict | None:
        """The final event (campaign_end or error) once it arrives."""
        if self.events.exists():
            with self.events.open(encoding="utf-8") as fh:
                fh.seek(self.offset)
                lines = fh.readlines()
                self.offset = fh.tell()
            for text in lines:
                event = json.loads(text)
                self.last, self.seen = event, time.monotonic()
                if event["event"] == "round_end":
                    self.bar.update(1)
                said = narrate.line(self.clock.timed(event), demo=self.demo)
                if said:
                    self._say(narrate.stamped(event, said))
                if event["event"] in ("campaign_end", "error"):
                    return event
        self.bar.set_postfix_str(self._status(), refresh=True)
        return None

    def _say(self, line: str) -> None:
        if self.progress:
            self.bar.write(line, file=sys.stderr)

    def _status(self) -> str:
        parts = [self.last.get("event", "starting").replace("_", " ")]
        for i, node_home in enumerate(self.node_homes):
            try:
                st = json.loads((node_home / "status.json").read_text())
            except (OSError, ValueError):
                continue
            if st.get("state") == "training":
                parts.append(f"n{i} r{st['round']} {st['step']}/{st['steps']} loss {st['loss']:.2f} "
                             f"{st['tokens_per_s']:.0f}tok/s")
        return " · ".join(parts)

    def close(self) -> None:
        self.bar.close()


def run_demo(nodes: int = 3, rounds: int = 2, model: str = SMOLLM2_ID, steps: int = 8, per_node: int = 200,
             eval_size: int = 48, progress: bool = True, timeout: float = 1800.0,
             quantization: str = "auto") -> dict:
    if nodes < 1 or rounds < 1:
        raise CommonsError("--nodes and --rounds must each be at least 1")
    root = home()
    work = root / "demo"
    shutil.rmtree(work, ignore_errors=True)
    name = "dates-iso-" + ("smollm2" if canonical_id(model) == SMOLLM2_ID else "tiny")
    shutil.rmtree(root / "campaigns" / name, ignore_errors=True)  # a demo always starts from round 1
    data = write_demo_data(work / "data", nodes, per_node, eval_size)
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    datasets = publish_training_data(data["train"])
    say(f"published the volunteers' data to the commons: {', '.join(d['name'] for d in datasets)}")
    campaign_file = work / "campaign.toml"
    campaign_file.write_text(dump(campaign_for(name, model, data["test"], nodes, rounds, steps, eval_size,
                                               datasets, quantization=quantization)))
    say(f"preparing base model {canonical_id(model)} (converted once, then cached in {cache_dir()})")
    local_path(model)
    Identity.load_or_create()
    follow_index(name)
    env = {"COMMONS_CACHE": str(cache_dir())}
    threads = max(1, (os.cpu_count() or 1) // nodes)
    net = Network(work)
    try:
        net.start_superlink(env={**env, "COMMONS_HOME": str(root)})
        say(f"SuperLink on {net.address}; starting {nodes} volunteer SuperNodes")
        node_homes = []
        for i in range(nodes):
            node_home = work / f"node{i}"
            (node_home / "logs").mkdir(parents=True, exist_ok=True)
            key = Identity.load_or_create(node_home / "identity" / "ed25519.key")
            say(f"  volunteer {i}: key {key.public_hex[:16]}…, data {data['train'][i].name}")
            net.start_supernode(f"node{i}", net.address,
                                {"home": str(node_home), "data": str(data["train"][i]), "threads": threads},
                                env={**env, "COMMONS_HOME": str(node_home)})
            node_homes.append(node_home)
        run_id = net.submit({"campaign": str(campaign_file), "home": str(root)})
        say(f"campaign {name} submitted as Flower run {run_id}")
        final = _follow(root / "campaigns" / name / "events.jsonl", node_homes, rounds, progress, timeout,
                        work)
    finally:
        net.close()
    if final["event"] == "error":
        raise CommonsError(f"the campaign failed: {final['message']} (logs in {work / 'logs'} and "
                           f"{root / 'logs'})")
    result = json.loads((root / "campaigns" / name / "result.json").read_text())
    summary = _register(result, nodes, rounds)
    events = [json.loads(x) for x in (root / "campaigns" / name / "events.jsonl").read_text().splitlines()]
    summary.update(timing.summary(timing.round_times(events)))
    return summary


def publish_training_data(files: list[Path]) -> list[dict]:
    """Each volunteer's slice becomes a signed commons dataset; the adapter's manifest cites their CIDs."""
    from commons.datasets import publish_dataset
    from commons.demo_task import LICENSE, SOURCE, STYLES

    families = list(STYLES)
    cited = []
    for i, file in enumerate(files):
        name = f"dates-iso-{families[i % len(families)]}-{i}"
        result = publish_dataset(file, LICENSE, SOURCE, name=name)
        cited.append({"cid": result["cid"], "name": name, "license": LICENSE})
    return cited


def _follow(events: Path, node_homes: list[Path], rounds: int, progress: bool, timeout: float, work: Path,
            offset: int = 0, demo: bool = True) -> dict:
    """The campaign's final event; gives up after `timeout` seconds without any event."""
    follower = Follower(events, node_homes, rounds, progress, offset, demo)
    try:
        while time.monotonic() < follower.seen + timeout:
            final = follower.poll()
            if final:
                return final
            time.sleep(0.5)
    finally:
        follower.close()
    raise CommonsError(f"the campaign said nothing for {timeout:.0f}s; see the logs in {work / 'logs'}")


def follow_index(name: str) -> None:
    """The campaign's ServerApp signs the next version of `name` without the index (coordinator/ cannot
    open it): bring this home's publish record up to the index first (protocol.publishing.follow)."""
    from index.db import IndexDB
    from protocol.publishing import follow

    follow(IndexDB(), name)


def _register(result: dict, nodes: int, rounds: int) -> dict:
    from index.db import IndexDB
    from protocol.signing.manifest import SIGNATURE_FILE, verify_directory
    from protocol.signing.trust import TrustPolicy

    summary = {
        "adapter_cid": result.get("adapter_cid"), "name": result["name"], "engine": "deployment",
        "nodes": nodes, "rounds": result["rounds"], "accuracy_base": result["accuracy_base"],
        "accuracy_adapter": result["accuracy_adapter"], "signature_valid": False, "index_url": None,
        "published": result["published"], "samples": result.get("samples", []),
    }
    if not result["published"]:
        summary["reason"] = result.get("reason")
        return summary
    adapter_dir = Path(result["adapter_dir"])
    verify_directory(adapter_dir, TrustPolicy(), record=False)  # raises on any problem
    summary["signature_valid"] = True
    IndexDB().register((adapter_dir / SIGNATURE_FILE).read_bytes(), result["adapter_cid"])
    summary["index_url"] = f"{config.load()['index_url'].rstrip('/')}/adapters/{result['name']}"
    summary["version"] = result.get("version")
    return summary
