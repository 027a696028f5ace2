"""OpenSSF's own `model_signing` (1.x, CLI and API) checks what `commons sign` writes, and agrees with us."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature
from safetensors.numpy import save_file

from protocol.errors import VerifyError
from protocol.signing.bundle import payload_of
from protocol.signing.dsse import canonical_json
from protocol.signing.keys import Identity
from protocol.signing.manifest import SIGNATURE_FILE, AdapterMeta, sign_directory, verify_directory
from protocol.signing.trust import TrustPolicy

verifying = pytest.importorskip("model_signing.verifying")
hashing = pytest.importorskip("model_signing.hashing")

BIN = Path(sys.executable).parent


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"COMMONS_HOME": str(tmp_path / "home")}
    return subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def make_adapter(path: Path) -> Path:
    path.mkdir()
    save_file({"layer.lora_A.weight": np.arange(16, dtype=np.float32).reshape(2, 8)},
              path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text('{"base_model_name_or_path": "HuggingFaceTB/SmolLM2", "r": 2}')
    (path / "README.md").write_text("# interop adapter\n")
    (path / "eval").mkdir()
    (path / "eval" / "curve.json").write_text("[0.1, 0.3]")
    return path


def theirs(directory: Path, public_key: Path) -> str:
    """'ok', or model_signing's reason for refusing (its API raises ValueError or InvalidSignature)."""
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(
            directory, directory / SIGNATURE_FILE
        )
    except (ValueError, InvalidSignature) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def ours(directory: Path) -> str:
    try:
        verify_directory(directory, TrustPolicy(), record=False)
    except VerifyError as exc:
        return str(exc)
    return "ok"


@pytest.fixture
def alice(tmp_path: Path) -> tuple[Identity, Path]:
    """An identity and its P-256 public key as a PEM file, what `--public_key` takes."""
    me = Identity.generate()
    pem = tmp_path / "alice.pub"
    pem.write_bytes(me.p256.public_pem())
    return me, pem


def test_the_model_signing_cli_accepts_a_folder_signed_by_commons_sign_and_refuses_a_tampered_one(
    tmp_path: Path,
) -> None:
    adapter = make_adapter(tmp_path / "adapter")
    signed = run(tmp_path, str(BIN / "commons"), "sign", "adapter", "--license", "MIT")
    assert signed.returncode == 0, signed.stderr
    exported = run(tmp_path, str(BIN / "commons"), "keys", "export", "--pem")
    assert exported.returncode == 0, exported.stderr
    (tmp_path / "key.pub").write_text(exported.stdout)
    verify = (str(BIN / "model_signing"), "verify", "key", "--signature", "adapter/model.sig",
              "--public_key", "key.pub", "adapter")

    accepted = run(tmp_path, *verify)
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() == "Verification succeeded"
    (adapter / "README.md").write_text("# interop adapter, tampered\n")
    refused = run(tmp_path, *verify)
    assert refused.returncode == 1
    assert "Verification failed with error: Signature mismatch" in refused.stderr
    assert "Hash mismatch for 'README.md'" in refused.stderr


def test_model_signing_refuses_a_tampered_file_as_we_do(tmp_path: Path, alice: tuple[Identity, Path]) -> None:
    me, pem = alice
    adapter = make_adapter(tmp_path / "adapter")
    sign_directory(adapter, AdapterMeta(name="interop"), me)
    assert theirs(adapter, pem) == ours(adapter) == "ok"

    data = bytearray((adapter / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (adapter / "adapter_model.safetensors").write_bytes(bytes(data))
    assert "Hash mismatch for 'adapter_model.safetensors'" in theirs(adapter, pem)
    assert "'adapter_model.safetensors' was modified after signing" in ours(adapter)


def test_model_signing_refuses_another_key_and_an_edited_statement(
    tmp_path: Path, alice: tuple[Identity, Path]
) -> None:
    me, pem = alice
    adapter = make_adapter(tmp_path / "adapter")
    sign_directory(adapter, AdapterMeta(name="interop"), me)
    other = tmp_path / "other.pub"
    other.write_bytes(Identity.generate().p256.public_pem())
    assert "Key mismatch" in theirs(adapter, other)

    bundle = json.loads((adapter / SIGNATURE_FILE).read_bytes())
    statement = json.loads(payload_of(bundle))
    statement["predicate"]["commons"]["license"] = "MIT"  # edited after signing, signature kept
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(canonical_json(statement)).decode()
    (adapter / SIGNATURE_FILE).write_bytes(canonical_json(bundle))
    assert theirs(adapter, pem).startswith("InvalidSignature")
    assert "signature check failed" in ours(adapter)


def test_hidden_files_are_left_out_by_both_and_one_added_later_is_refused_by_both(
    tmp_path: Path, alice: tuple[Identity, Path]
) -> None:
    me, pem = alice
    adapter = make_adapter(tmp_path / "adapter")
    (adapter / ".cache").mkdir()
    (adapter / ".cache" / "blob").write_text("local junk")
    (adapter / "eval" / ".DS_Store").write_text("")
    (adapter / ".git").mkdir()
    (adapter / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (adapter / ".env").write_text("TOKEN=x\n")
    sign_directory(adapter, AdapterMeta(name="interop"), me)
    assert theirs(adapter, pem) == ours(adapter) == "ok"

    (adapter / ".cache" / "blob").write_text("changed junk")  # left out, so changing it changes nothing
    assert theirs(adapter, pem) == ours(adapter) == "ok"

    (adapter / ".surprise").write_text("added after signing")
    assert "Extra files found" in theirs(adapter, pem) and ".surprise" in theirs(adapter, pem)
    assert "'.surprise' is not covered by model.sig" in ours(adapter)


def test_model_signing_hashes_exactly_the_files_we_sign(tmp_path: Path) -> None:
    me = Identity.generate()
    adapter = make_adapter(tmp_path / "adapter")
    (adapter / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (adapter / "eval" / ".cache").mkdir()
    (adapter / "eval" / ".cache" / "x").write_text("junk")
    sign_directory(adapter, AdapterMeta(name="interop"), me)
    statement = json.loads(payload_of(json.loads((adapter / SIGNATURE_FILE).read_bytes())))
    ignored = statement["predicate"]["serialization"]["ignore_paths"]
    assert ignored == [".gitattributes", "eval/.cache", SIGNATURE_FILE]

    hashed = hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=False).hash(adapter)
    digests = {str(item.identifier): item.digest.digest_hex for item in hashed.resource_descriptors()}
    verified = verify_directory(adapter, TrustPolicy(), record=False)
    assert digests == {f["name"]: f["sha256"] for f in verified.files}
