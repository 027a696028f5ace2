"""Chat datasets: schema errors by line, ShareGPT import, PII scrubbing, dedupe, `commons data add`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from protocol.data.dataset import check_license, fingerprint, prepare
from protocol.errors import CommonsError

ME = "ab" * 32


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path: Path, items: list[object]) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items),
                    encoding="utf-8")
    return path


def test_native_and_sharegpt_records_are_normalized_scrubbed_and_deduplicated(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "chats.jsonl", [
        chat("What is 2+2? Mail me at ann@example.org", "4"),
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "Capital of France?"},
                           {"from": "gpt", "value": "Paris."}]},
        chat("what is 2+2?   mail me at ANN@example.org", "4"),  # same up to case/space after scrubbing
        "",
        chat("my key is AKIAIOSFODNN7EXAMPLE", "Revoke it now."),
    ])
    records, report = prepare(src, "cc-by-4.0", "unit test", ME)
    assert report.as_dict() == {"lines": 4, "records": 3, "duplicates": 1, "sharegpt_converted": 1,
                                "pii_removed": {"aws_key": 1, "email": 2}}
    assert records[0]["messages"][0]["content"] == "What is 2+2? Mail me at [EMAIL]"
    assert [m["role"] for m in records[1]["messages"]] == ["system", "user", "assistant"]
    assert records[2]["messages"][0]["content"] == "my key is [AWS_KEY]"
    assert all(r["license"] == "CC-BY-4.0" and r["source"] == "unit test" and r["contributor"] == ME
               for r in records)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "chats.jsonl:2: invalid JSON"),
    ('["a list"]', "chats.jsonl:2: expected a JSON object"),
    ('{"text": "hi"}', "chats.jsonl:2: no 'messages' (chat) or 'conversations' (ShareGPT) key"),
    ('{"messages": []}', "chats.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}',
     "chats.jsonl:2: messages[0].role is 'bot'; use one of"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}',
     "chats.jsonl:2: messages[0].content must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}',
     "needs at least one 'user' and one 'assistant' message"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}',
     "chats.jsonl:2: conversations[0].from is 'alien'"),
    ('{"conversations": [{"value": "x"}]}', "conversations[0] must be an object with 'from' and 'value'"),
])
def test_bad_lines_fail_with_one_line_naming_the_line(tmp_path: Path, line: str, message: str) -> None:
    src = write_jsonl(tmp_path / "chats.jsonl", [chat("fine", "ok"), line])
    with pytest.raises(CommonsError) as err:
        prepare(src, "MIT", "s", ME)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sharegpt_json_array_file_and_licence_and_source_checks(tmp_path: Path) -> None:
    src = tmp_path / "dump.json"
    src.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                  {"from": "gpt", "value": "yo"}]}]))
    records, report = prepare(src, "LicenseRef-internal", "a dump", ME)
    assert report.sharegpt == 1 and records[0]["license"] == "LicenseRef-internal"
    with pytest.raises(CommonsError, match="unknown licence 'CC-BY'; use an SPDX id"):
        check_license("CC-BY")
    with pytest.raises(CommonsError, match="--source is empty"):
        prepare(src, "MIT", "  ", ME)
    with pytest.raises(CommonsError, match="not found"):
        prepare(tmp_path / "missing.jsonl", "MIT", "x", ME)
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(CommonsError, match="holds no records"):
        prepare(empty, "MIT", "x", ME)
    assert (fingerprint([{"role": "user", "content": "A  b"}])
            == fingerprint([{"role": "user", "content": "a b"}]))


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMMONS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _run(args: list[str], input: str | None = None) -> object:
    from commons.cli.data import data_group

    return CliRunner().invoke(data_group, args, input=input, catch_exceptions=True)


def test_data_add_signs_stores_and_registers_the_dataset(tmp_path: Path, cli_home: Path) -> None:
    from index.db import IndexDB
    from protocol.content.blockstore import BlockStore
    from protocol.signing.keys import Identity
    from protocol.signing.manifest import verify_directory

    src = write_jsonl(tmp_path / "my-chats.jsonl", [chat("call me on +44 20 7946 0958", "Sure."),
                                                     chat("hi", "hello"), chat("hi", "hello")])
    result = _run(["add", str(src), "--license", "CC-BY-4.0", "--source", "my notes", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["name"], out["version"], out["records"], out["duplicates"]) == ("my-chats", 1, 2, 1)
    assert out["pii_removed"] == {"phone": 1}
    me = Identity.load_or_create()
    verified = verify_directory(Path(out["path"]), record=False)
    assert verified.signer == me.public_hex and verified.meta.kind == "dataset"
    assert verified.meta.license == "CC-BY-4.0" and verified.meta.eval["pii_removed"] == {"phone": 1}
    lines = [json.loads(x) for x in (Path(out["path"]) / "data.jsonl").read_text().splitlines()]
    assert lines[0]["contributor"] == me.public_hex and "[PHONE]" in lines[0]["messages"][0]["content"]
    assert BlockStore().missing(out["cid"]) == []
    entry = IndexDB().resolve("my-chats")
    assert entry["cid"] == out["cid"] and entry["kind"] == "dataset"

    again = _run(["add", str(src), "--license", "CC-BY-4.0", "--source", "my notes"])
    assert again.exit_code == 0 and again.stdout.strip() == out["cid"]  # same records: same dataset

    write_jsonl(src, [chat("a new question", "a new answer")])
    v2 = json.loads(_run(["add", str(src), "--license", "CC-BY-4.0", "--source", "my notes",
                          "--json"]).stdout)
    assert v2["version"] == 2 and IndexDB().resolve("my-chats")["meta"]["previous"] == out["cid"]


def test_data_add_review_publishes_only_accepted_records(tmp_path: Path, cli_home: Path) -> None:
    src = write_jsonl(tmp_path / "mine.jsonl",
                      [chat("keep me", "ok"), chat("drop me, I'm jo@example.com", "ok")])
    result = _run(["add", str(src), "--license", "CC0-1.0", "--source", "me", "--review", "--json"],
                  input="y\nn\n")
    assert result.exit_code == 0, result.output
    assert "drop me, I'm [EMAIL]" in result.output  # the volunteer sees the scrubbed text before deciding
    out = json.loads(result.stdout.strip().splitlines()[-1])
    lines = (Path(out["path"]) / "data.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "keep me" in lines[0]
    declined = _run(["add", str(src), "--license", "CC0-1.0", "--source", "me", "--review", "--name", "x"],
                    input="n\nn\n")
    assert declined.exit_code != 0 and "declined every record" in str(declined.exception)


def test_data_add_bad_input_is_one_line_error_and_publishes_nothing(tmp_path: Path, cli_home: Path) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", [chat("ok", "ok"), chat("ok", "ok"), '{"messages": "nope"}'])
    result = _run(["add", str(src), "--license", "MIT", "--source", "x"])
    assert isinstance(result.exception, CommonsError)
    assert "bad.jsonl:3:" in str(result.exception) and "\n" not in str(result.exception)
    assert not (cli_home / "datasets").exists()
    review = _run(["review", str(tmp_path / "bad.jsonl")])
    assert isinstance(review.exception, CommonsError)
    good = write_jsonl(tmp_path / "good.jsonl", [chat("write to me@example.com", "ok")])
    report = json.loads(_run(["review", str(good), "--json"]).stdout)
    assert report["pii_removed"] == {"email": 1} and not (cli_home / "datasets").exists()
