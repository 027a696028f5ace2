"""Node step throughput vs what users pick today: TRL's `SFTTrainer` + PEFT, measured in the same run.

    python -m bench trl                     # `make bench`: SmolLM2-135M-Instruct, one demo round's shape
    python bench/bench_trl.py tiny 4        # the tiny model, 4 steps

Both arms get the same: the model (modeling/load.load_base, float32 on the CPU: a CPU node's placement,
node/hardware.py), the LoRA (the demo's r=8, alpha=16 on every projection), the records (the demo's date
data, every style), the steps, batch and max_length (a demo round: 8 steps of 8 examples, 96 tokens),
AdamW at a constant lr with gradient clipping at 1.0. The records are exactly one epoch of steps × batch,
so both arms train on the same real tokens, in a different order. Each arm has its own copy of the
model: TRL patches the forward of the model it is given. TRL gets the data as conversational
prompt-completion pairs, so it masks the prompt as ours does, and runs minimal and offline: no eval, no
saving, no logging, report_to none, the dataloader in this process. Two SFTConfig defaults are turned off
to match a node: gradient checkpointing (ours checkpoints only when its memory plan needs it) and bf16
autocast (a CPU node trains in float32).

What differs is each loop. Both draw shuffled batches and pad each to its longest: ours as a node runs
it, with TrainConfig's defaults (grouping batches by length is off by default, node/train.py says why);
`grouped_padding` is the padding ours would have with `group_by_length` on, counted from the order
`epoch_order` draws (not timed). TRL sends only the positions it learns from through the LM head (its
fused LM head, which also computes the entropy and top-1 metrics it logs), where ours computes the
logits of every position, the masked prompt's included.

    ratio             = our real tokens/s ÷ TRL's (goal ≥ 1.0)
    padding           = padded positions ÷ positions computed, for each arm (and `grouped_padding`)
    learned_fraction  = tokens the loss learns ÷ real tokens: the share of positions TRL's LM head sees

The arms alternate in ABBA order after a warm-up of each; the ratio is the median of the back-to-back
pairs' ratios (as bench_train.py), so load from other processes on a shared machine hits both alike.
Timed: ours by train()'s own clock (after encoding, to the returned adapter); TRL from `on_train_begin`
(model prepared, optimizer made) to the last step's end. Tokenizing the data is outside both.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from commons.demo_task import STYLES, make_records
from modeling.load import load_base
from modeling.lora import lora_config, wrap
from node.train import TrainConfig, encode, epoch_order, label_tokens, train

LORA = {"r": 8, "alpha": 16}  # the demo's campaign (commons/demo.py)


@dataclass
class Run:
    tokens: int  # real (unpadded) tokens trained on
    seconds: float
    padding: float  # padded positions ÷ positions computed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def prompt_completion(record: dict) -> dict:
    """A chat record as TRL's conversational prompt-completion pair: the final turn is the completion."""
    return {"prompt": record["messages"][:-1], "completion": record["messages"][-1:]}


def trl_trainer(base: Any, tokenizer: Any, records: list[dict], config: TrainConfig,
                out: str) -> tuple[Any, dict]:
    """An SFTTrainer over `base` with PEFT's LoRA, and the tally each run fills in: real tokens,
    positions computed, and the clock at the start and after the last step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    tally: dict[str, float] = {}

    class Tallied(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            tally["tokens"] = tally.get("tokens", 0) + int(mask.sum())
            tally["positions"] = tally.get("positions", 0) + mask.numel()
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            tally["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            tally["end"] = time.perf_counter()

    args = SFTConfig(
        output_dir=out, max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        max_length=config.max_length, learning_rate=config.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=config.seed,
        activation_checkpointing=False, bf16=False, use_cpu=True,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_list([prompt_completion(r) for r in records])
    trainer = Tallied(model=base, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=lora_config(LORA), callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # it prints each run's metrics to stdout, where our JSON goes
    return trainer, tally


def trl_once(trainer: Any, tally: dict, steps: int | None = None) -> Run:
    """One `trainer.train()`: its configured steps, or the first `steps` of them (a warm-up)."""
    configured = trainer.args.max_steps
    trainer.args.max_steps = steps or configured
    tally.clear()
    try:
        trainer.train()
    finally:
        trainer.args.max_steps = configured
    tokens = int(tally["tokens"])
    return Run(tokens, tally["end"] - tally["start"], 1 - tokens / max(tally["positions"], 1))


def ours_once(model: Any, tokenizer: Any, records: list[dict], config: TrainConfig) -> Run:
    result = train(model, tokenizer, records, config)
    return Run(result.tokens, result.seconds, result.padding)


def measure(model_id: str = "smollm2", steps: int = 8, batch_size: int = 8, max_length: int = 96,
            reps: int = 4) -> dict:
    # load: one copy of the base for each arm, the same records for both
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=2e-3, max_length=max_length, seed=0)
    records = make_records(steps * batch_size, list(STYLES), seed=3)
    base, tokenizer = load_base(model_id)
    model = wrap(base, LORA)
    trl_base, _ = load_base(model_id)
    with tempfile.TemporaryDirectory() as out:
        trainer, tally = trl_trainer(trl_base, tokenizer, records, config, out)
        # warm-up, then ABBA pairs: whichever runs second in a pair is measurably faster on a shared box
        warm = TrainConfig(steps=2, batch_size=batch_size, lr=config.lr, max_length=max_length)
        ours_once(model, tokenizer, records, warm)
        trl_once(trainer, tally, steps=2)
        ours, trl = [], []
        for rep in range(reps):
            for arm in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):
                if arm == "ours":
                    ours.append(ours_once(model, tokenizer, records, config))
                else:
                    trl.append(trl_once(trainer, tally))
    examples = [encode(tokenizer, r["messages"], max_length) for r in records]
    learned = label_tokens(examples) / sum(len(ids) for ids, _ in examples)
    return {**figures(model_id, config, ours, trl), "learned_fraction": round(learned, 3),
            "grouped_padding": round(grouped_padding([len(ids) for ids, _ in examples], config), 4)}


def grouped_padding(lengths: list[int], config: TrainConfig) -> float:
    """The padding of one epoch drawn as train() draws it with `group_by_length` on, each step one
    micro-batch."""
    order = epoch_order(random.Random(config.seed), lengths, config.batch_size, group=True)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    computed = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / computed


def figures(model_id: str, config: TrainConfig, ours: list[Run], trl: list[Run]) -> dict:
    import torch
    import trl as trl_package

    ratio = float(np.median([o.tokens_per_s / t.tokens_per_s for o, t in zip(ours, trl)]))
    best_ours = max(r.tokens_per_s for r in ours)
    best_trl = max(r.tokens_per_s for r in trl)
    return {
        "name": "bench_trl", "ratio": round(ratio, 3), "best_of_ratio": round(best_ours / best_trl, 3),
        "goal": 1.0, "model": model_id, "steps": config.steps, "batch_size": config.batch_size,
        "max_length": config.max_length, "lora": LORA, "trl_version": trl_package.__version__,
        "ours_tokens_per_s": [round(r.tokens_per_s, 1) for r in ours],
        "trl_tokens_per_s": [round(r.tokens_per_s, 1) for r in trl],
        "ours_tokens": ours[0].tokens, "trl_tokens": trl[0].tokens,
        "ours_padding": round(ours[0].padding, 4), "trl_padding": round(trl[0].padding, 4),
        "threads": torch.get_num_threads(),
        "summary": f"node train {best_ours:.0f} tok/s vs TRL SFTTrainer+PEFT {best_trl:.0f} tok/s "
                   f"({model_id}); padding {ours[0].padding:.1%} vs {trl[0].padding:.1%}",
    }


def run() -> dict:
    return measure()


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(measure(*(args[:1] or ["smollm2"]), *[int(a) for a in args[1:2]]), indent=1))
