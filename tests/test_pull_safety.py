"""`commons pull` against a real index: it never deletes what it did not create, writes only what the
signature covers, and says how to take an older version on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from live_index import LiveIndex, commons, directory_entries, directory_node, raw_leaf, serve_index

from protocol.errors import CommonsError
from protocol.signing.keys import Identity
from protocol.signing.manifest import SIGNATURE_FILE


@pytest.fixture
def index(tmp_path: Path):
    with serve_index(tmp_path / "index") as live:
        yield live


@pytest.fixture
def alice() -> Identity:
    return Identity.generate()


def pull(index: LiveIndex, ref: str, out: Path | str, cwd: Path, *extra: str) -> tuple[int, str, str]:
    return commons("pull", ref, "--index", index.url, "--out", str(out), *extra, cwd=cwd)


def one_line_error(code: int, err: str) -> str:
    assert code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- 1: the output folder ------------------------------------------------------------------------------


def test_pull_into_a_folder_holding_other_files_refuses_and_deletes_nothing(index, alice, tmp_path):
    index.publish("keep-out", alice)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("my own work")
    (project / "src" / "main.py").write_text("print('hi')")
    for out, cwd in ((project, tmp_path), (".", project)):  # `--out DIR` and `--out .` inside it
        line = one_line_error(*pull(index, "keep-out", out, cwd)[::2])
        assert "is not empty" in line and "--out" in line and "nothing was deleted" in line, line
    assert (project / "notes.txt").read_text() == "my own work"
    assert (project / "src" / "main.py").read_text() == "print('hi')"
    assert not (project / SIGNATURE_FILE).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pull-")] == []


def test_pull_again_into_its_own_earlier_pull_replaces_it(index, alice, tmp_path):
    index.publish("two-versions", alice)
    out = tmp_path / "adapter"
    code, _, err = pull(index, "two-versions", out, tmp_path)
    assert code == 0, err
    _, cid2 = index.publish("two-versions", alice, version=2)
    code, stdout, err = pull(index, "two-versions", out, tmp_path, "--json")
    assert code == 0, err
    assert json.loads(stdout)["version"] == 2 and json.loads(stdout)["cid"] == cid2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # the old copy is gone


def test_pull_into_an_earlier_pull_of_another_name_or_with_files_added_refuses(index, alice, tmp_path):
    index.publish("first-name", alice)
    index.publish("second-name", alice)
    out = tmp_path / "adapter"
    assert pull(index, "first-name", out, tmp_path)[0] == 0
    line = one_line_error(*pull(index, "second-name", out, tmp_path)[::2])
    assert "earlier pull of first-name" in line and "nothing was deleted" in line, line
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # the user made it a repository
    line = one_line_error(*pull(index, "first-name", out, tmp_path)[::2])
    assert "is not empty" in line, line
    assert (out / ".git" / "HEAD").exists() and (out / "adapter_config.json").exists()


# --- 2: entries the signature does not cover -----------------------------------------------------------


def _wrapped(index: LiveIndex, cid: str, extra: dict[str, str]) -> str:
    """The signed directory `cid` with extra entries (path → text) added around it, as an attacker would."""
    store = index.store

    def tree(entries: dict, paths: dict[str, str]) -> dict:
        out = dict(entries)
        groups: dict[str, dict[str, str]] = {}
        for path, text in paths.items():
            head, _, rest = path.partition("/")
            if rest:
                groups.setdefault(head, {})[rest] = text
            else:
                out[head] = raw_leaf(store, text.encode())
        for head, sub in groups.items():
            out[head] = directory_node(store, tree({}, sub))
        return out

    return str(directory_node(store, tree(directory_entries(store, cid), extra)))


def test_a_signed_adapter_wrapped_with_unsigned_entries_is_refused_and_nothing_is_written(index, alice,
                                                                                          tmp_path):
    envelope, cid = index.publish("wrapped", alice, register=False)
    hook = "[core]\n\tfsmonitor = touch /tmp/pwned-by-commons\n"
    for extra in ({".git/config": hook}, {".env": "TOKEN=x"}, {"run_me.py": "import os"}):
        bad = _wrapped(index, cid, extra)
        out = tmp_path / f"out-{len(extra)}-{next(iter(extra)).strip('.')[:3]}"
        line = one_line_error(*pull(index, bad, out, tmp_path)[::2])
        assert "not covered by model.sig" in line and next(iter(extra)).split("/")[0] in line, line
        assert not out.exists()
        reply = httpx.post(f"{index.url}/api/announce", json={"envelope": envelope.decode(), "cid": bad})
        assert reply.status_code == 403 and "not covered by model.sig" in reply.json()["detail"], reply.text
    assert httpx.post(f"{index.url}/api/announce",
                      json={"envelope": envelope.decode(), "cid": cid}).status_code == 201


# --- 6: the printed snippet, and older versions on purpose --------------------------------------------


def test_the_printed_snippet_escapes_the_signed_base_model(index, alice, tmp_path):
    from index.sample import make_entry
    from protocol.signing.manifest import AdapterMeta

    sneaky = 'x", "y"); __import__("os").system("id"); ("'
    envelope, cid = make_entry(tmp_path / "sneaky", AdapterMeta(name="sneaky", base_model=sneaky), alice,
                               index.store)
    index.db.register(envelope, cid)
    code, out, err = pull(index, "sneaky", tmp_path / "got", tmp_path)
    assert code == 0, err
    snippet = out[out.index("from commons import"):].strip()
    compiled = compile(snippet, "<snippet>", "exec")
    assert compiled.co_names == ("commons", "load_adapter", "model"), compiled.co_names  # one call, no more
    assert json.dumps(sneaky) in snippet


def test_control_characters_in_manifest_strings_are_refused() -> None:
    from protocol.errors import CommonsError
    from protocol.signing.manifest import AdapterMeta

    for field in ("base_model", "base_revision", "campaign", "license"):
        with pytest.raises(CommonsError, match=f"{field} must not hold control characters"):
            AdapterMeta.from_dict({**AdapterMeta(name="x").to_dict(), field: "a\x1b[2Jb"}, error=CommonsError)


def test_an_older_version_needs_allow_older_and_then_pulls(index, alice, tmp_path):
    index.publish("aging", alice)
    index.publish("aging", alice, version=2)
    assert pull(index, "aging", tmp_path / "new", tmp_path)[0] == 0
    line = one_line_error(*pull(index, "aging@1", tmp_path / "old", tmp_path)[::2])
    assert "older than v2" in line and "--allow-older" in line, line
    code, out, err = pull(index, "aging@1", tmp_path / "old", tmp_path, "--allow-older", "--json")
    assert code == 0 and json.loads(out)["version"] == 1, err


def test_files_written_into_the_target_while_pulling_are_never_deleted(index, alice, tmp_path, monkeypatch):
    import commons.pull as pulling

    index.publish("busy", alice)
    out = tmp_path / "adapter"
    pulling.pull("busy", out=out, index_url=index.url, progress=False)
    index.publish("busy", alice, version=2)
    fetch = pulling.fetch_signed

    def slow_fetch(*args, **kwargs):  # the user starts working in the folder while the pull runs
        (out / "notes.md").write_text("written during the pull")
        return fetch(*args, **kwargs)

    monkeypatch.setattr(pulling, "fetch_signed", slow_fetch)
    with pytest.raises(CommonsError, match="changed while pulling") as err:
        pulling.pull("busy", out=out, index_url=index.url, progress=False)
    assert "\n" not in str(err.value)
    assert (out / "notes.md").read_text() == "written during the pull"
