"""bench/bench_quality.py on the tiny model: it compares like with like, and reports what it says it does.

The figures that matter (federated ÷ centralized on SmolLM2) come from `make bench` and are in
docs/federation.md; here the bench's own machinery is checked in a few seconds: one volunteer for one
round through the real campaign runner is exactly the centralized run, and the report holds both
references with their ratios.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_quality import TASKS, Setup, measure, split

ONE = Setup(model="tiny", tasks=("dates",), seeds=(0,), nodes=1, rounds=1, steps=3, batch_size=2, lr=0.02,
            max_length=64, per_node=8, eval_size=12,
            campaign={"aggregation": "fedavg", "shards": "none", "outer": {"optimizer": "none"}})


def test_one_volunteer_for_one_round_is_exactly_the_centralized_run(tmp_path: Path,
                                                                    one_torch_thread: None) -> None:
    result = measure(ONE, folder=tmp_path)
    [row] = result["rows"]
    assert row["central_compute"]["loss"] == pytest.approx(row["federated"]["loss"], rel=1e-5)
    assert row["central_compute_ratio"]["loss"] == pytest.approx(1.0, rel=1e-5)
    assert row["central_steps"]["loss"] == pytest.approx(row["federated"]["loss"], rel=1e-5)
    summary = result["tasks"]["dates"]
    assert {"central_compute_accuracy_ratio", "central_compute_loss_ratio", "central_steps_loss_ratio",
            "federated_accuracy"} <= set(summary)
    assert summary["federated_loss"]["min"] == summary["federated_loss"]["max"]  # one seed: no spread


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_non_iid_split_gives_each_volunteer_one_style_family(task: str) -> None:
    module = TASKS[task]
    families = list(module.STYLES)
    nodes, held_out = split(Setup(tasks=(task,), nodes=3, per_node=40, eval_size=200), task, 0)
    for i, records in enumerate(nodes):
        mine = module.make_records(40, [families[i]], 1 + i)
        assert records == mine
    assert len(held_out) == 200 and len({r["messages"][1]["content"] for r in held_out}) > 150
    iid, _ = split(Setup(tasks=(task,), nodes=3, per_node=40, iid=True), task, 0)
    assert iid[0] == module.make_records(40, families, 1)
