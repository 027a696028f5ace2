"""Campaign files: a good one loads, every mistake is one line that names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.campaign import Campaign, dump, load
from protocol.errors import CommonsError
from protocol.models import SMOLLM2_ID


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "test.jsonl").write_text("{}\n")
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_a_minimal_campaign_gets_sane_defaults_and_canonical_ids(tmp_path: Path) -> None:
    campaign = load(write(tmp_path, 'name = "x"\nbase_model = "smollm2"\neval_file = "test.jsonl"\n'))
    assert campaign.base_model == SMOLLM2_ID and campaign.base_revision == "gguf-q4_1"
    assert campaign.rounds >= 1 and campaign.lora.r == 8 and campaign.eval_file == (tmp_path / "test.jsonl").resolve()


def test_dump_round_trips(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text("{}\n")
    original = Campaign(name="x", base_model="tiny", eval_file=tmp_path / "test.jsonl", rounds=3, aggregation="robust",
                        datasets=[{"cid": "Qm", "name": "d", "license": "CC0-1.0"}])
    path = tmp_path / "d.toml"
    path.write_text(dump(original))
    again = load(path)
    assert (again.rounds, again.aggregation, again.datasets, again.lora) == (3, "robust", original.datasets, original.lora)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('base_model = "m"\neval_file = "test.jsonl"\n', "needs `name = ...`"),
        ('name = "x"\nbase_model = "m"\neval_file = "nope.jsonl"\n', "does not exist"),
        ('name = "x"\nbase_model = "m"\neval_file = "test.jsonl"\naggregation = "mean"\n', "use one of fedavg, exact, robust"),
        ('name = "x"\nbase_model = "m"\neval_file = "test.jsonl"\nroundz = 2\n', "unknown key campaign.roundz"),
        ('name = "x"\nbase_model = "m"\neval_file = "test.jsonl"\n[train]\nstep = 2\n', "unknown key train.step"),
        ('name = "x"\nbase_model = "m"\neval_file = "test.jsonl"\nrounds = 0\n', "at least 1"),
        ('name = "x\nbase', "not valid TOML"),
    ],
)
def test_mistakes_are_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(CommonsError) as err:
        load(write(tmp_path, text))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_missing_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(CommonsError, match="pass --campaign"):
        load(tmp_path / "absent.toml")


def test_a_campaign_file_can_name_its_volunteers(tmp_path: Path) -> None:
    from coordinator.campaign import load

    (tmp_path / "test.jsonl").write_text("")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "vols.txt").write_text("# none yet\n")
    (tmp_path / "c.toml").write_text('name = "c"\nbase_model = "tiny"\neval_file = "test.jsonl"\n'
                                     'volunteers = "keys/vols.txt"\n')
    campaign = load(tmp_path / "c.toml")
    assert campaign.closed and campaign.volunteers == str(tmp_path / "keys" / "vols.txt")
    (tmp_path / "c.toml").write_text('name = "c"\nbase_model = "tiny"\neval_file = "test.jsonl"\nvolunteers = "no.txt"\n')
    with pytest.raises(CommonsError, match="volunteers = .*no.txt' does not exist: point it at the file"):
        load(tmp_path / "c.toml")
