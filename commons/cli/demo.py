"""`commons demo`: the whole path on this machine in a few minutes."""

from __future__ import annotations

import signal

import click

from commons.cli.output import emit


@click.command("demo")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 16),
              help="Volunteer SuperNodes to start.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1, 100), help="Federated rounds.")
@click.option("--steps", default=8, show_default=True, type=click.IntRange(1, 10_000),
              help="Local steps per round.")
@click.option("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct", show_default=True,
              help="Base model id ('tiny' for a seconds-fast random model).")
@click.option("--quantization", default="auto", show_default=True,
              type=click.Choice(["auto", "none", "nf4", "int8"]),
              help="How each volunteer holds the base model (nf4/int8 through bitsandbytes: slow on a CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
def demo_command(nodes: int, rounds: int, steps: int, base_model: str, quantization: str,
                 as_json: bool) -> None:
    """Run a real federated LoRA campaign (Flower SuperLink + SuperNodes on loopback)
    and publish the adapter."""
    from commons.demo import run_demo

    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `timeout`, systemd: stop every process, as on Ctrl-C
    summary = run_demo(nodes=nodes, rounds=rounds, model=base_model, steps=steps, quantization=quantization,
                       progress=not as_json)
    emit(as_json, {k: v for k, v in summary.items() if k != "samples"}, lambda: _show(summary))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _show(summary: dict) -> None:
    """The demo's last words for people: sample answers, scores, what was published and how to use it."""
    click.echo("")
    for sample in summary.get("samples", [])[:3]:
        click.echo(f"  {sample['prompt']!r:58} → {sample['answer']!r} (expected {sample['expected']})")
    click.echo(f"\nexact match on held-out dates: base {summary['accuracy_base']:.1%} → adapter "
               f"{summary['accuracy_adapter']:.1%}")
    if summary.get("utilization") is not None:
        click.echo(f"rounds took {', '.join(f'{s:.0f}' for s in summary['round_seconds'])} s; from round 2 "
                   f"the volunteers spent {summary['utilization']:.0%} of each round in training steps (the "
                   "model stays loaded)")
    if not summary["published"]:
        click.echo(f"not published: {summary.get('reason')}")
        return
    click.echo(f"adapter {summary['name']} v{summary.get('version')}  {summary['adapter_cid']}")
    click.echo(f"signed by the coordinator, signature valid: {summary['signature_valid']}; "
               f"{summary['nodes']} volunteers, {summary['rounds']} rounds")
    click.echo(f"\nsee it:  commons index serve   then open {summary['index_url']}")
    click.echo(f"use it:  commons pull {summary['name']}")


commands = [demo_command]
