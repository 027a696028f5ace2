"""The `commons` CLI (`cli/`, one module per command group) and the Python API for developers.

    cli/          the commands; `cli/__init__.py:COMMAND_MODULES` lists the groups, `cli/output.py` is the one
                  `--json` vs text helper. A new command group is a new module plus one line there.
    pull.py       resolve NAME or CID, fetch, verify, lay out a PEFT folder (`commons pull`, `load_adapter`)
    publish.py    what `commons publish` signs about a PEFT folder (the path itself: protocol.publishing)
    datasets.py   `commons data add`: validate, scrub, dedupe, publish chat data
    demo.py       `commons demo`: a real campaign on this machine; `demo_task.py` is its task and data,
                  `clock_task.py` a second generated task (times of day) for the quality benchmark
    flower.py     real Flower processes (SuperLink behind the gate, SuperNodes, runners) and run submission
    processes.py  every process below the ones we started, so stopping leaves none behind
    narrate.py    the coordinator terminal's one line per campaign event; `timing.py` where round time went
    addresses.py  the addresses other machines can dial, for the lines a user copies
    config.py     $COMMONS_HOME/config.toml, which CLI flags override

    >>> model = load_adapter("smollm2", "dates-iso")   # pulled, verified, loaded as a PeftModel
"""


def load_adapter(base_model: str, adapter: str, index_url: str | None = None):
    """A `PeftModel`: `adapter` is a pulled folder, a CID or NAME[@VERSION] (pulled and verified first)."""
    from pathlib import Path

    from peft import PeftModel

    from modeling.load import load_base

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        from commons.pull import pull

        folder = pull(adapter, index_url=index_url, progress=False).path
    model, tokenizer = load_base(base_model)
    peft_model = PeftModel.from_pretrained(model, str(folder))
    peft_model.tokenizer = tokenizer  # so callers can chat right away
    return peft_model
