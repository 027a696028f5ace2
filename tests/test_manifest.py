"""Signed manifests: what a user sees when an adapter is intact, and each way it is refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from protocol.content import unixfs
from protocol.errors import CommonsError, VerifyError
from protocol.signing.bundle import KeyBinding, payload_of, pem_hint, sign_bundle
from protocol.signing.dsse import canonical_json
from protocol.signing.keys import Identity
from protocol.signing.manifest import (
    SIGNATURE_FILE,
    AdapterMeta,
    sign_directory,
    verify_directory,
    verify_envelope,
)
from protocol.signing.trust import TrustPolicy, revoke_key, trust_dir, trust_key

COMMONS = Path(sys.executable).with_name("commons")


def make_adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    tensors = {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.arange(32, dtype=np.float32).reshape(
            4, 8
        ),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((8, 4), dtype=np.float32),
    }
    save_file(tensors, path / "adapter_model.safetensors")
    config = {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "revision": "main",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "README.md").write_text("# demo adapter\n")
    (path / "eval").mkdir()
    (path / "eval" / "curve.json").write_text("[0.25, 0.5]")
    return path


def statement_of(directory: Path) -> dict:
    return json.loads(payload_of(json.loads((directory / SIGNATURE_FILE).read_bytes())))


def write_statement(
    directory: Path, statement: dict, identity: Identity, encode: Callable[[dict], bytes] = canonical_json
) -> bytes:
    """Sign any statement with a real key, bypassing sign_directory's own checks (a forger's tool)."""
    data = canonical_json(sign_bundle(encode(statement), identity))
    (directory / SIGNATURE_FILE).write_bytes(data)
    return data


def rejected(call: Callable[[], object], fragment: str) -> str:
    with pytest.raises(VerifyError) as info:
        call()
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message and len(message) < 200, message
    return message


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMMONS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture
def signed(tmp_path: Path, home: Path, alice: Identity) -> Path:
    directory = make_adapter(tmp_path / "adapter")
    sign_directory(directory, AdapterMeta(name="demo", version=2, license="Apache-2.0"), alice)
    return directory


def check(directory: Path, **kwargs: object) -> object:
    return lambda: verify_directory(directory, **kwargs)


# --- the happy path and the format --------------------------------------------------------------------------


def test_signed_directory_verifies_and_follows_model_signing_v1(signed: Path, alice: Identity) -> None:
    verified = verify_directory(signed)
    assert verified.signer == alice.public_hex
    assert (
        verified.meta.name == "demo" and verified.meta.version == 2 and verified.meta.license == "Apache-2.0"
    )
    names = [f["name"] for f in verified.files]
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "eval/curve.json"]
    for entry in verified.files:
        assert entry["cid"] == unixfs.file_cid(signed / entry["name"], 0)
        assert entry["sha256"] == hashlib.sha256((signed / entry["name"]).read_bytes()).hexdigest()

    raw = (signed / SIGNATURE_FILE).read_bytes()
    bundle = json.loads(raw)
    assert raw == canonical_json(bundle)  # one canonical byte encoding on disk
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["verificationMaterial"] == {
        "publicKey": {"hint": hashlib.sha256(alice.p256.public_pem()).hexdigest()},
        "tlogEntries": [],
    }
    envelope = bundle["dsseEnvelope"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert envelope["signatures"][0]["keyid"] == ""  # as model_signing writes it: the hint names the key
    statement = statement_of(signed)
    assert statement["predicate"]["commons"]["signer"] == KeyBinding.of(alice).to_dict()
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    predicate = statement["predicate"]
    assert (
        predicate["serialization"]["method"] == "files"
        and predicate["serialization"]["allow_symlinks"] is False
    )
    assert [r["name"] for r in predicate["resources"]] == names
    root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in predicate["resources"])).hexdigest()
    assert statement["subject"] == [{"name": "demo", "digest": {"sha256": root}}]
    assert predicate["commons"]["files"][0] == {
        "name": "README.md",
        "size": 15,
        "cid": verified.files[0]["cid"],
    }


def test_sign_refuses_bad_metadata_with_one_line(tmp_path: Path, home: Path, alice: Identity) -> None:
    directory = make_adapter(tmp_path / "adapter")
    with pytest.raises(CommonsError, match="adapter metadata.name must be 1-100 letters"):
        sign_directory(directory, AdapterMeta(name="org/name"), alice)
    with pytest.raises(CommonsError, match="numpy number or other non-JSON value"):
        sign_directory(directory, AdapterMeta(name="demo", eval={"acc": np.float32(0.5)}), alice)
    with pytest.raises(CommonsError, match="NaN/Infinity"):
        sign_directory(directory, AdapterMeta(name="demo", eval={"acc": float("nan")}), alice)
    assert not (directory / SIGNATURE_FILE).exists()


def test_hidden_files_are_not_signed_like_ipfs_add_but_listed_as_ignored(tmp_path: Path,
                                                                          alice: Identity) -> None:
    directory = make_adapter(tmp_path / "adapter")
    (directory / ".cache").mkdir()
    (directory / ".cache" / "x").write_text("local junk")
    (directory / "eval" / ".DS_Store").write_text("")
    sign_directory(directory, AdapterMeta(name="demo"), alice)
    assert statement_of(directory)["predicate"]["serialization"]["ignore_paths"] == [
        ".cache", "eval/.DS_Store", SIGNATURE_FILE]
    verified = verify_directory(directory)
    assert len(verified.files) == 4 and verified.ignored == (".cache", "eval/.DS_Store")
    (directory / ".git").mkdir()  # appeared after signing: not covered, not listed
    rejected(check(directory), "'.git' is not covered by model.sig (nor listed as ignored)")


def test_verify_envelope_checks_signature_without_files_and_records_nothing(signed: Path, home: Path) -> None:
    verified = verify_envelope((signed / SIGNATURE_FILE).read_bytes())
    assert verified.meta.name == "demo"
    assert not (trust_dir() / "versions.json").exists()


# --- files on disk ------------------------------------------------------------------------------------------


def test_changed_byte_is_refused(signed: Path) -> None:
    path = signed / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    rejected(check(signed), "'adapter_model.safetensors' was modified after signing (sha256 differs)")


def test_changed_size_is_refused(signed: Path) -> None:
    (signed / "README.md").write_text("# demo adapter, now longer\n")
    rejected(check(signed), "'README.md' was modified after signing (size differs)")


def test_missing_file_is_refused(signed: Path) -> None:
    (signed / "eval" / "curve.json").unlink()
    rejected(check(signed), "'eval/curve.json' is listed in model.sig but missing")


def test_extra_file_is_refused(signed: Path) -> None:
    (signed / "eval" / "extra.txt").write_text("surprise")
    rejected(check(signed), "'eval/extra.txt' is not covered by model.sig")


def test_missing_signature_is_refused(signed: Path) -> None:
    (signed / SIGNATURE_FILE).unlink()
    rejected(check(signed), "no model.sig in")


def test_symlinks_are_refused_anywhere(signed: Path, tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("x")
    (signed / "eval" / "link.txt").symlink_to(tmp_path / "outside.txt")
    rejected(check(signed), "'eval/link.txt' is a symlink; symlinks are refused")
    (signed / "eval" / "link.txt").unlink()
    (signed / "linked_dir").symlink_to(tmp_path)
    rejected(check(signed), "'linked_dir' is a symlink")
    (signed / "linked_dir").unlink()
    (signed / ".hidden_link").symlink_to(tmp_path / "outside.txt")
    rejected(check(signed), "'.hidden_link' is a symlink")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt"])
def test_pickle_formats_are_refused_even_when_signed(
    tmp_path: Path, home: Path, alice: Identity, suffix: str
) -> None:
    directory = make_adapter(tmp_path / "adapter")
    (directory / f"weights{suffix}").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CommonsError, match=rf"pickle-capable format \({suffix}\)"):
        sign_directory(directory, AdapterMeta(name="demo"), alice)
    # a forger signs it anyway: the verifier still refuses the file
    statement = statement_of_signed_without(directory, f"weights{suffix}", alice)
    write_statement(directory, statement, alice)
    rejected(check(directory), f"'weights{suffix}' is a pickle-capable format ({suffix}); only safetensors")


def statement_of_signed_without(directory: Path, name: str, identity: Identity) -> dict:
    """Sign the folder as if `name` were an ordinary file: move it aside, sign, rename the resource back."""
    data = (directory / name).read_bytes()
    (directory / name).rename(directory / "plain.txt")
    (directory / "plain.txt").write_bytes(b"\0" + data)  # defuse the magic so signing accepts it
    sign_directory(directory, AdapterMeta(name="demo"), identity)
    statement = statement_of(directory)
    (directory / "plain.txt").unlink()
    (directory / name).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    for resource in statement["predicate"]["resources"]:
        if resource["name"] == "plain.txt":
            resource.update(name=name, digest=digest)
    for entry in statement["predicate"]["commons"]["files"]:
        if entry["name"] == "plain.txt":
            entry.update(name=name, size=len(data), cid=unixfs.file_cid(data))
    statement["predicate"]["resources"].sort(key=lambda r: r["name"])
    statement["predicate"]["commons"]["files"].sort(key=lambda r: r["name"])
    root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in statement["predicate"]["resources"]))
    statement["subject"][0]["digest"]["sha256"] = root.hexdigest()
    return statement


def test_pickles_under_other_names_are_refused(signed: Path) -> None:
    (signed / "weights.dat").write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    rejected(check(signed), "'weights.dat' is a pickle; only safetensors")
    (signed / "weights.dat").unlink()
    with zipfile.ZipFile(signed / "model.zip", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(1))
    rejected(check(signed), "'model.zip' is a zip holding a pickle")
    (signed / "model.zip").unlink()
    (signed / "fake.safetensors").write_bytes(b"\x80\x02not a header")
    rejected(check(signed), "'fake.safetensors' is not a valid safetensors file")


def test_oversized_file_is_refused(signed: Path, home: Path) -> None:
    # the manifest claims a file above the limit: refused before anything is hashed
    rejected(
        check(signed, policy=TrustPolicy(max_file_size=100)),
        "'adapter_config.json' is 153 bytes, over the 100",
    )
    (home / "trust").mkdir(parents=True, exist_ok=True)
    (home / "trust" / "policy.json").write_text('{"max_file_size": 50}')
    rejected(check(signed), "over the 50 bytes limit; raise max_file_size in $COMMONS_HOME/trust/policy.json")
    # a file that grew on disk past the limit is refused without reading it
    (signed / "README.md").write_bytes(b"x" * 5000)
    rejected(
        check(signed, policy=TrustPolicy(max_file_size=1000)),
        "'README.md' is 5000 bytes, over the 1000 bytes",
    )


# --- names inside the manifest (a forger signs whatever names they like) ------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.txt", "path traversal"),
        ("eval/../../evil", "path traversal"),
        ("/etc/passwd", "absolute path"),
        ("C:/evil", "absolute path"),
        ("eval\\evil", "backslash"),
        ("eval//x", "empty path component"),
        ("./x", "empty path component"),
        ("a\nb", "control character"),
        (".ssh/key", "hidden path"),
    ],
)
def test_unsafe_names_in_manifest_are_refused(signed: Path, alice: Identity, name: str, reason: str) -> None:
    statement = statement_of(signed)
    statement["predicate"]["resources"][0]["name"] = name
    statement["predicate"]["commons"]["files"][0]["name"] = name
    write_statement(signed, statement, alice)
    rejected(check(signed), f"({reason}); refuse this adapter")


def test_duplicate_resource_names_are_refused(signed: Path, alice: Identity) -> None:
    statement = statement_of(signed)
    predicate = statement["predicate"]
    predicate["resources"].insert(1, dict(predicate["resources"][0]))
    predicate["commons"]["files"].insert(1, dict(predicate["commons"]["files"][0]))
    write_statement(signed, statement, alice)
    rejected(check(signed), "duplicate resource name 'README.md' in model.sig")


def test_duplicate_json_keys_are_refused(signed: Path) -> None:
    raw = (signed / SIGNATURE_FILE).read_bytes()
    (signed / SIGNATURE_FILE).write_bytes(raw.replace(b'{"payload":', b'{"payload":"AAAA","payload":', 1))
    rejected(check(signed), "has the JSON key 'payload' twice")


# --- structure and encoding ---------------------------------------------------------------------------------


def test_malformed_json_is_refused(signed: Path) -> None:
    (signed / SIGNATURE_FILE).write_bytes(b'{"payload": ')
    rejected(check(signed), "model.sig is not valid JSON")


def test_wrong_type_missing_and_unknown_fields_are_refused(signed: Path, alice: Identity) -> None:
    statement = statement_of(signed)
    statement["predicate"]["commons"]["version"] = "3"
    write_statement(signed, statement, alice)
    rejected(check(signed), "model.sig commons.version must be an integer")

    statement = statement_of(signed)
    statement["predicate"]["commons"]["version"] = True
    write_statement(signed, statement, alice)
    rejected(check(signed), "commons.version must be an integer")

    statement = statement_of(signed)
    del statement["predicate"]["commons"]["license"]
    write_statement(signed, statement, alice)
    rejected(check(signed), "model.sig commons is missing the field 'license'")

    statement = statement_of(signed)
    statement["predicate"]["commons"]["license"] = "MIT"
    statement["predicate"]["surprise"] = 1
    write_statement(signed, statement, alice)
    rejected(check(signed), "model.sig predicate has an unknown field 'surprise'")


def test_non_canonical_payload_is_refused_even_with_a_valid_signature(signed: Path, alice: Identity) -> None:
    statement = statement_of(signed)
    write_statement(signed, statement, alice, encode=lambda s: json.dumps(s, sort_keys=True).encode())
    rejected(check(signed), "model.sig payload is not in canonical form")
    unsorted = dict(reversed(list(statement.items())))
    write_statement(signed, unsorted, alice, encode=lambda s: json.dumps(s, separators=(",", ":")).encode())
    rejected(check(signed), "model.sig payload is not in canonical form")
    statement["predicate"]["commons"]["campaign"] = "café"
    escaped = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()  # \u00e9, not UTF-8
    write_statement(signed, statement, alice, encode=lambda s: escaped)
    rejected(check(signed), "model.sig payload is not in canonical form")
    write_statement(signed, statement, alice)  # the same statement, canonical: accepted
    assert verify_directory(signed).meta.campaign == "café"


def test_non_canonical_envelope_is_refused(signed: Path) -> None:
    envelope = json.loads((signed / SIGNATURE_FILE).read_bytes())
    (signed / SIGNATURE_FILE).write_text(json.dumps(envelope, indent=2))
    rejected(check(signed), "model.sig is not in canonical form")


def test_a_statement_signed_by_another_p256_key_under_the_same_binding_is_refused(
    signed: Path, alice: Identity
) -> None:
    mallory = Identity.generate()
    bundle = sign_bundle(payload_of(json.loads((signed / SIGNATURE_FILE).read_bytes())), mallory)
    (signed / SIGNATURE_FILE).write_bytes(canonical_json(bundle))
    rejected(check(signed), "publicKey hint does not name the P-256 key")
    bundle["verificationMaterial"]["publicKey"]["hint"] = pem_hint(alice.p256.public_der)
    (signed / SIGNATURE_FILE).write_bytes(canonical_json(bundle))
    rejected(check(signed), f"signature check failed for key {alice.public_hex[:16]}")


# --- trust policy -------------------------------------------------------------------------------------------


def test_first_signer_is_pinned_and_another_signer_is_refused(signed: Path, alice: Identity) -> None:
    verify_directory(signed)  # trust on first use: pins demo -> alice
    mallory = Identity.generate()
    sign_directory(signed, AdapterMeta(name="demo", version=3), mallory)
    rejected(check(signed), f"'demo' is pinned to signer {alice.public_hex[:16]}")


def test_dry_check_does_not_pin_or_record(signed: Path, home: Path) -> None:
    verify_directory(signed, record=False)
    assert not (trust_dir() / "pins.json").exists() and not (trust_dir() / "versions.json").exists()
    verify_directory(signed)
    pins = json.loads((trust_dir() / "pins.json").read_text())
    assert list(pins) == ["demo"]


def test_failed_verification_records_nothing(signed: Path, alice: Identity) -> None:
    sign_directory(signed, AdapterMeta(name="demo", version=9), alice)
    (signed / "README.md").write_text("# tampered!!!\n")
    rejected(check(signed), "was modified after signing")
    assert not (trust_dir() / "versions.json").exists()


def test_trusted_keys_file_is_an_allowlist(signed: Path, alice: Identity) -> None:
    trust_key(Identity.generate().public_hex, "someone else")
    rejected(check(signed), f"signer {alice.public_hex[:16]}… is not in your trusted keys")
    trust_key(alice.public_hex)
    assert verify_directory(signed).signer == alice.public_hex


def test_revoked_key_is_refused_even_when_trusted(signed: Path, alice: Identity) -> None:
    trust_key(alice.public_hex)
    revoke_key(alice.public_hex, "leaked")
    rejected(check(signed), f"signer {alice.public_hex[:16]}… is revoked")


def test_expired_manifest_is_refused(signed: Path, alice: Identity) -> None:
    statement = statement_of(signed)
    statement["predicate"]["commons"]["expires"] = "2020-01-01T00:00:00Z"
    write_statement(signed, statement, alice)
    rejected(check(signed), "the manifest for 'demo' v2 expired at 2020-01-01T00:00:00Z")


def test_older_version_is_refused_after_a_newer_one(tmp_path: Path, signed: Path, alice: Identity) -> None:
    old = make_adapter(tmp_path / "old")
    sign_directory(old, AdapterMeta(name="demo", version=1), alice)
    verify_directory(signed)  # v2 seen
    rejected(check(old), "replay refused: 'demo' v1 is older than v2 already seen")
    assert (
        verify_directory(old, TrustPolicy(allow_older=True, pins={"demo": alice.public_hex})).meta.version
        == 1
    )


def test_same_version_with_other_content_is_refused(tmp_path: Path, signed: Path, alice: Identity) -> None:
    verify_directory(signed)
    other = make_adapter(tmp_path / "other")
    (other / "README.md").write_text("# a different v2\n")
    sign_directory(other, AdapterMeta(name="demo", version=2), alice)
    rejected(check(other), "replay refused: 'demo' v2 differs from the v2 already seen")
    verify_directory(signed)  # the same v2 again is fine


def test_corrupt_trust_files_name_the_file(signed: Path, home: Path) -> None:
    (home / "trust").mkdir(parents=True, exist_ok=True)
    (home / "trust" / "trusted_keys").write_text("not-a-key\n")
    with pytest.raises(CommonsError, match="line 1 of .*trusted_keys is not a hex ed25519 public key"):
        verify_directory(signed)
    (home / "trust" / "trusted_keys").unlink()
    (home / "trust" / "versions.json").write_text("{")
    with pytest.raises(CommonsError, match="versions.json is not valid JSON"):
        verify_directory(signed)


# --- CLI ----------------------------------------------------------------------------------------------------


def test_cli_sign_reads_adapter_config_and_bumps_version(tmp_path: Path, home: Path) -> None:
    from commons.cli.sign import sign_command

    directory = make_adapter(tmp_path / "my adapter")
    result = CliRunner().invoke(sign_command, [str(directory), "--license", "MIT", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["name"] == "my-adapter" and info["version"] == 1 and info["files"] == 4
    meta = verify_directory(directory).meta
    assert meta.base_model == "HuggingFaceTB/SmolLM2-135M" and meta.base_revision == "main"
    assert meta.lora_config["r"] == 4 and meta.license == "MIT"
    result = CliRunner().invoke(
        sign_command, [str(directory), "--name", "demo", "--base-model", "other/model"]
    )
    assert result.exit_code == 0 and "signed demo v2" in result.stdout
    assert verify_directory(directory).meta.base_model == "other/model"


def _commons(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(COMMONS), *args], check=False, capture_output=True, text=True, env=os.environ.copy(), timeout=60
    )


def test_cli_verify_exit_codes_and_one_line_errors(signed: Path) -> None:
    ok = _commons("verify", str(signed), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True and json.loads(ok.stdout)["version"] == 2
    (signed / "README.md").write_text("# tampered adapter\n")
    bad = _commons("verify", str(signed))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: 'README.md' was modified after signing (size differs); re-download the adapter"
    ]
    bad_json = _commons("verify", str(signed), "--json")
    assert bad_json.returncode == 1 and json.loads(bad_json.stdout)["ok"] is False


def test_cli_verify_a_cid_from_the_block_store(signed: Path) -> None:
    from commons.cli.sign import verify_command
    from protocol.content.blockstore import BlockStore

    cid = BlockStore().add_path(signed)
    result = CliRunner().invoke(verify_command, [cid, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "demo"
    result = CliRunner().invoke(verify_command, ["QmcFm2XoFcRm4hnELLGYUMEe647MzgLwgFSGXST1Dxy9hS"])
    assert isinstance(result.exception, CommonsError) and "not in the local block store" in str(
        result.exception
    )
