"""What may be signed at all (an allowlist of file kinds), and SPDX licence expressions."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from live_index import commons, serve_index
from test_dag_bombs import signed_dag

from protocol.content import unixfs
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID
from protocol.errors import CommonsError, VerifyError
from protocol.signing.keys import Identity
from protocol.signing.manifest import AdapterMeta, sign_directory, verify_envelope

SNEAKY = pickle.dumps(print, protocol=0)  # text-only opcodes: no \x80 magic byte to catch


def test_a_protocol_0_pickle_without_a_suffix_is_refused_at_signing(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "weights").write_bytes(SNEAKY)
    with pytest.raises(CommonsError,
                       match="'weights' is not a kind of file an adapter or dataset holds") as err:
        sign_directory(folder, AdapterMeta(name="sneaky"), Identity.generate())
    assert "\n" not in str(err.value)


def test_a_signed_manifest_listing_a_suffixless_pickle_is_refused_by_pull_before_fetching_it(
        tmp_path: Path, isolated_home: Path) -> None:
    with serve_index(tmp_path / "index") as index:
        blob = CID.decode(unixfs.import_file(SNEAKY, 0, index.store.put))
        envelope, root = signed_dag(index.store, Identity.generate(), "sneaky", "weights", blob, len(SNEAKY))
        with pytest.raises(VerifyError, match="'weights' is not a kind of file"):
            verify_envelope(envelope)
        code, _, err = commons("pull", root, "--index", index.url, "--out", str(tmp_path / "out"),
                               cwd=tmp_path)
    assert code == 1 and "'weights' is not a kind of file" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert not BlockStore(isolated_home / "blocks").has(str(blob))  # refused before it was fetched


@pytest.mark.parametrize(("given", "canonical"), [
    ("MIT AND CC-BY-4.0", "MIT AND CC-BY-4.0"),
    ("mit and cc-by-4.0", "MIT AND CC-BY-4.0"),
    ("(MIT OR Apache-2.0) AND CC-BY-SA-4.0", "(MIT OR Apache-2.0) AND CC-BY-SA-4.0"),
    ("GPL-3.0-only WITH Classpath-exception-2.0", "GPL-3.0-only WITH Classpath-exception-2.0"),
    ("LicenseRef-internal OR MIT", "LicenseRef-internal OR MIT"),
])
def test_spdx_expressions_are_accepted_in_canonical_form(given: str, canonical: str) -> None:
    from protocol.data.dataset import check_license

    assert check_license(given) == canonical


@pytest.mark.parametrize(("given", "fragment"), [
    ("MIT AND", "ends too early"), ("MIT AND AND MIT", "'AND' is not a licence id"),
    ("(MIT", "ends too early"), ("MIT OR CC-BY", "unknown licence 'CC-BY'"),
    ("MIT MIT", "'MIT' is left over"),
])
def test_malformed_expressions_are_one_line_errors(given: str, fragment: str) -> None:
    from protocol.data.dataset import check_license

    with pytest.raises(CommonsError, match=fragment) as err:
        check_license(given)
    assert "\n" not in str(err.value)


def test_a_dataset_record_carries_the_expression(tmp_path: Path) -> None:
    from protocol.data.dataset import prepare

    src = tmp_path / "chats.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "yo"}]}))
    records, _ = prepare(src, "cc-by-4.0 and mit", "my notes", "aa" * 32)
    assert records[0]["license"] == "CC-BY-4.0 AND MIT"


def test_the_licence_conflict_check_reads_expressions() -> None:
    from index.licenses import conflicts

    def warned(adapter: str, data: str) -> bool:
        return bool(conflicts(adapter, [{"name": "d", "license": data}]))

    assert warned("MIT", "MIT AND CC-BY-NC-4.0")  # both apply: non-commercial
    assert not warned("MIT", "MIT OR CC-BY-NC-4.0")  # the MIT choice is open to commercial use
    assert warned("CC-BY-NC-4.0 OR MIT", "CC-BY-NC-4.0")  # the adapter's MIT choice allows commerce
    assert not warned("CC-BY-NC-4.0 AND MIT", "CC-BY-NC-4.0")
    assert warned("Apache-2.0", "CC-BY-SA-4.0 AND MIT")
    assert not warned("CC-BY-SA-4.0", "(MIT OR CC-BY-SA-4.0) AND CC-BY-SA-4.0")
    assert warned("MIT", "CC-BY-ND-4.0 AND MIT")
