"""Campaign files: a good one loads, every mistake is one line that names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.campaign import Campaign, dump, load
from modeling.load import SMOLLM2_ID
from protocol.content.multiformats import RAW, cid_for
from protocol.errors import CommonsError


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "test.jsonl").write_text("{}\n")
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_a_minimal_campaign_gets_sane_defaults_and_canonical_ids(tmp_path: Path) -> None:
    campaign = load(write(tmp_path, 'name = "x"\nbase_model = "smollm2"\neval_file = "test.jsonl"\n'))
    assert campaign.base_model == SMOLLM2_ID and campaign.base_revision == "gguf-q4_1"
    assert (campaign.rounds >= 1 and campaign.lora.r == 8
            and campaign.eval_file == (tmp_path / "test.jsonl").resolve())


def test_dump_round_trips(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text("{}\n")
    cid = str(cid_for(RAW, b"records"))
    original = Campaign(name="x", base_model="tiny", eval_file=tmp_path / "test.jsonl", rounds=3,
                        aggregation="robust", datasets=[{"cid": cid, "name": "d", "license": "CC0-1.0"}])
    path = tmp_path / "d.toml"
    path.write_text(dump(original))
    again = load(path)
    assert ((again.rounds, again.aggregation, again.datasets, again.lora)
            == (3, "robust", original.datasets, original.lora))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('base_model = "m"\neval_file = "test.jsonl"\n', "needs `name = ...`"),
        ('name = "x"\nbase_model = "m"\neval_file = "nope.jsonl"\n', "does not exist"),
        ('name = "x"\nbase_model = "m"\neval_file = "test.jsonl"\naggregation = "mean"\n',
         "use one of fedavg, exact, robust"),
        ('name = "x"\nbase_model = "m"\neval_file = "test.jsonl"\nroundz = 2\n',
         "unknown key campaign.roundz in the campaign file: did you mean rounds?"),
        ('name = "x"\nbase_model = "m"\neval_file = "test.jsonl"\n[train]\nstep = 2\n',
         "unknown key train.step in the campaign file: did you mean steps?"),
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
    (tmp_path / "c.toml").write_text('name = "c"\nbase_model = "tiny"\neval_file = "test.jsonl"\n'
                                     'volunteers = "no.txt"\n')
    with pytest.raises(CommonsError, match="volunteers = .*no.txt' does not exist: point it at the file"):
        load(tmp_path / "c.toml")


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ('min_nodes = "two"',
         'min_nodes = "two" in the campaign file must be a whole number, e.g. min_nodes = 1'),
        ("rounds = 2.5", "rounds = 2.5 in the campaign file must be a whole number, e.g. rounds = 2"),
        ("rounds = true", "rounds = true in the campaign file must be a whole number"),
        ('[train]\nlr = "0.002"',
         'train.lr = "0.002" in the campaign file must be a number: write lr = 0.002 (no quotes)'),
        ("[train]\nlr = 0", "train.lr = 0 in the campaign file must be above 0 and at most 1"),
        ("[lora]\nr = 0", "lora.r = 0 in the campaign file must be between 1 and 1024"),
        ('[lora]\ntarget_modules = "q_proj"',
         "lora.target_modules = \"q_proj\" in the campaign file must be a list"),
        ("publish_margin = 5", "publish_margin = 5 in the campaign file must be between -1 and 1"),
        ("node_wait = -1", "node_wait = -1 in the campaign file must be 0 or more"),
        ("min_coverage = 0", "min_coverage = 0 in the campaign file must be at least 1"),
        ('early_stop = "yes"', 'early_stop = "yes" in the campaign file must be a whole number'),
        ("license = 1", "license = 1 in the campaign file must be a string in quotes"),
    ],
)
def test_every_key_is_type_and_range_checked_in_one_line(tmp_path: Path, line: str, said: str) -> None:
    with pytest.raises(CommonsError) as err:
        load(write(tmp_path, f'name = "x"\nbase_model = "tiny"\neval_file = "test.jsonl"\n{line}\n'))
    assert str(err.value).startswith(said) and "\n" not in str(err.value)


def test_a_whole_number_is_accepted_where_a_number_is_asked(tmp_path: Path) -> None:
    campaign = load(write(tmp_path,
                          'name = "x"\nbase_model = "tiny"\neval_file = "test.jsonl"\nround_timeout = 60\n'
                          "[train]\nlr = 1\n"))
    assert campaign.round_timeout == 60.0 and isinstance(campaign.train.lr, float)


def test_the_docs_placeholder_cid_is_refused_even_for_local_data(tmp_path: Path) -> None:
    text = ('name = "x"\nbase_model = "tiny"\neval_file = "test.jsonl"\n[[datasets]]\ncid = "bafy..."\n'
            'name = "my-chats"\n')
    with pytest.raises(CommonsError,
                       match=r'^\[\[datasets\]\] entry 1 needs cid = a dataset CID \(what `commons data '
                             r'add` printed\); "bafy..." is not one$'):
        load(write(tmp_path, text))
    with pytest.raises(CommonsError, match="unknown key licence in \\[\\[datasets\\]\\] entry 1"):
        load(write(tmp_path, text.replace('"bafy..."', f'"{cid_for(RAW, b"x")}"') + 'licence = "MIT"\n'))


def test_a_campaign_without_a_licence_is_published_under_the_default_it_names(tmp_path: Path) -> None:
    unnamed = load(write(tmp_path, 'name = "x"\nbase_model = "tiny"\neval_file = "test.jsonl"\n'))
    named = load(write(tmp_path,
                       'name = "x"\nbase_model = "tiny"\neval_file = "test.jsonl"\nlicense = "MIT"\n'))
    assert (unnamed.license, unnamed.published_license()) == ("", "Apache-2.0")
    assert named.published_license() == "MIT"


def test_every_campaign_key_is_documented_in_the_federation_guide() -> None:
    from coordinator.campaign import DPSpec, LoraSpec, TrainSpec
    from coordinator.outer import OuterConfig

    guide = (Path(__file__).resolve().parent.parent / "docs" / "federation.md").read_text()
    internal = {"source", "closed", "lora", "train", "outer", "dp", "datasets"}  # tables, what parse() fills
    keys = [k for k in Campaign.__dataclass_fields__ if k not in internal]
    for cls in (LoraSpec, TrainSpec, OuterConfig, DPSpec):
        keys += list(cls.__dataclass_fields__)
    missing = [k for k in keys if f"\n{k} = " not in guide and f"\n# {k} = " not in guide]
    assert not missing, f"undocumented campaign keys: {missing}"


def test_the_guide_s_campaign_file_loads_once_its_placeholder_cid_is_replaced(tmp_path: Path) -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "federation.md").read_text()
    example = guide.split("## The campaign file\n\n```toml\n", 1)[1].split("```", 1)[0]
    with pytest.raises(CommonsError, match=r'entry 1 needs cid = a dataset CID .*; "Qm..." is not one$'):
        load(write(tmp_path, example))
    campaign = load(write(tmp_path, example.replace('"Qm..."', f'"{cid_for(RAW, b"chats", version=1)}"')))
    assert (campaign.license, campaign.early_stop, campaign.train.lr) == ("Apache-2.0", 2, 2e-3)
