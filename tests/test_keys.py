"""The node identity: ed25519 keys on disk, signatures, the libp2p peer id, the `commons keys` commands."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from commons.cli.keys import keys_group
from protocol.content.multiformats import b58decode
from protocol.errors import CommonsError, VerifyError
from protocol.signing.keys import (
    Identity,
    P256Key,
    default_key_path,
    p256_path,
    peer_id_from_public_key,
    rotate,
    verify_p256,
    verify_signature,
)
from protocol.signing.manifest import AdapterMeta, sign_directory, verify_directory
from protocol.signing.trust import TrustPolicy, trust_dir


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMMONS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_sign_and_verify_bytes() -> None:
    me, other = Identity.generate(), Identity.generate()
    sig = me.sign(b"adapter bytes")
    assert len(sig) == 64
    assert verify_signature(me.public_key, b"adapter bytes", sig)
    assert not verify_signature(me.public_key, b"adapter bytez", sig)
    assert not verify_signature(other.public_key, b"adapter bytes", sig)
    assert not verify_signature(me.public_key, b"adapter bytes", sig[:-1] + bytes([sig[-1] ^ 1]))
    # malformed input is "not verified", never an exception
    assert not verify_signature(me.public_key[:31], b"adapter bytes", sig)
    assert not verify_signature(me.public_key, b"adapter bytes", sig[:63])
    assert not verify_signature(b"\x00" * 32, b"", b"\x00" * 64)


def test_key_file_is_created_once_with_mode_0600(home: Path) -> None:
    first = Identity.load_or_create()
    path = default_key_path()
    assert first.path == path and path.parent == home / "identity"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first.secret_seed.hex()
    again = Identity.load_or_create()
    assert again.public_hex == first.public_hex and len(first.public_hex) == 64
    with pytest.raises(CommonsError, match="already exists; remove it first"):
        Identity.generate().save(path)
    assert Identity.load().public_hex == first.public_hex  # not clobbered


def test_unsafe_or_broken_key_files_are_refused(home: Path) -> None:
    path = Identity.load_or_create().path
    path.chmod(0o644)
    with pytest.raises(CommonsError, match=r"readable by other users; run `chmod 600 .*ed25519.key`"):
        Identity.load()
    path.chmod(0o600)
    path.write_text("definitely not a key\n")
    with pytest.raises(CommonsError, match="is not an ed25519 key file"):
        Identity.load()
    with pytest.raises(CommonsError, match="no identity key at .*; create one with `commons keys show`"):
        Identity.load(home / "nope.key")


def test_p256_key_is_made_beside_the_identity_on_first_use_with_mode_0600(home: Path) -> None:
    me = Identity.load_or_create()
    path = home / "identity" / "ed25519.p256.pem"
    assert p256_path(me.path) == path and not path.exists()
    der = me.p256.public_der
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert Identity.load().p256.public_der == der  # loaded, not made again
    assert verify_p256(der, b"data", me.p256.sign(b"data"))
    assert not verify_p256(der, b"datA", me.p256.sign(b"data"))
    assert not verify_p256(Identity.generate().p256.public_der, b"data", me.p256.sign(b"data"))
    assert not verify_p256(der[:-1], b"data", me.p256.sign(b"data")) and not verify_p256(der, b"data", b"")


def test_unsafe_or_broken_p256_key_files_are_refused(home: Path) -> None:
    path = p256_path(Identity.load_or_create().path)
    P256Key.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(CommonsError, match=r"readable by other users; run `chmod 600 .*ed25519.p256.pem`"):
        P256Key.load(path)
    path.chmod(0o600)
    path.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CommonsError, match="is not an unencrypted P-256 key"):
        P256Key.load(path)
    with pytest.raises(CommonsError, match="already exists"):
        P256Key.generate().save(path)


def test_an_identity_used_in_memory_keeps_its_p256_key_when_saved(tmp_path: Path) -> None:
    me = Identity.generate()
    der = me.p256.public_der
    me.save(tmp_path / "me.key")
    assert (tmp_path / "me.p256.pem").exists()
    assert Identity.load(tmp_path / "me.key").p256.public_der == der


def test_peer_id_is_the_libp2p_encoding_of_the_same_key() -> None:
    me = Identity.generate()
    peer = me.peer_id()
    assert peer.startswith("12D3KooW")
    raw = b58decode(peer)
    # identity multihash (0x00, len 36) of protobuf PublicKey{Type: Ed25519(1), Data: 32 bytes}
    assert raw == b"\x00\x24" + b"\x08\x01\x12\x20" + me.public_key


def test_peer_id_matches_py_libp2p() -> None:
    ed25519 = pytest.importorskip("libp2p.crypto.ed25519")
    peer_module = pytest.importorskip("libp2p.peer.id")
    for _ in range(5):
        me = Identity.generate()
        theirs = peer_module.ID.from_pubkey(ed25519.Ed25519PublicKey.from_bytes(me.public_key)).to_base58()
        assert me.peer_id() == theirs
        pair = me.libp2p_key_pair()
        assert pair.public_key.to_bytes() == me.public_key
        assert peer_module.ID.from_pubkey(pair.public_key).to_base58() == theirs
    with pytest.raises(CommonsError, match="32 bytes"):
        peer_id_from_public_key(b"short")


def test_rotate_archives_revokes_and_repins(home: Path, tmp_path: Path) -> None:
    old = Identity.load_or_create()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "README.md").write_text("hi\n")
    sign_directory(adapter, AdapterMeta(name="mine"), old)
    verify_directory(adapter)  # pins "mine" to the old key

    old_p256 = old.p256.public_der
    was, new, archive = rotate()
    assert was.public_hex == old.public_hex != new.public_hex
    assert Identity.load(archive).p256.public_der == old_p256  # archived with the key that vouched for it
    assert Identity.load().p256.public_der != old_p256
    assert Identity.load().public_hex == new.public_hex
    assert Identity.load(archive).public_hex == old.public_hex
    assert old.public_hex in (trust_dir() / "revoked_keys").read_text()
    assert json.loads((trust_dir() / "pins.json").read_text()) == {"mine": new.public_hex}
    with pytest.raises(VerifyError, match="is revoked"):
        verify_directory(adapter)
    sign_directory(adapter, AdapterMeta(name="mine", version=2), new)
    assert verify_directory(adapter).signer == new.public_hex
    assert TrustPolicy.load().revoked == {old.public_hex}


def test_cli_show_export_rotate(home: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(keys_group, ["show", "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    assert "created a new identity" in shown.stderr
    me = Identity.load()
    assert info == {"public_key": me.public_hex, "peer_id": me.peer_id(), "path": str(default_key_path())}
    text = runner.invoke(keys_group, ["show"]).stdout
    assert me.peer_id() in text and me.public_hex in text

    public = runner.invoke(keys_group, ["export"])
    assert public.stdout.strip() == me.public_hex and public.stderr == ""
    pem = runner.invoke(keys_group, ["export", "--pem"])
    assert pem.exit_code == 0 and pem.stdout.encode() == me.p256.public_pem()
    assert pem.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    assert runner.invoke(keys_group, ["export", "--pem", "--secret"]).exit_code == 2
    secret = runner.invoke(keys_group, ["export", "--secret"])
    assert secret.stdout.strip() == me.secret_seed.hex()
    assert "warning: this is your SECRET key" in secret.stderr

    aborted = runner.invoke(keys_group, ["rotate"], input="n\n")
    assert aborted.exit_code == 1 and Identity.load().public_hex == me.public_hex
    rotated = runner.invoke(keys_group, ["rotate", "--yes", "--json"])
    assert rotated.exit_code == 0, rotated.output
    result = json.loads(rotated.stdout)
    assert result["old"] == me.public_hex and result["new"] == Identity.load().public_hex
    assert Path(result["archive"]).exists()


def test_cli_trust_and_revoke(home: Path) -> None:
    runner = CliRunner()
    key = Identity.generate().public_hex
    assert runner.invoke(keys_group, ["trust", key.upper(), "--note", "bob"]).exit_code == 0
    assert runner.invoke(keys_group, ["revoke", key]).exit_code == 0
    policy = TrustPolicy.load()
    assert policy.trusted == {key} and policy.revoked == {key}
    bad = runner.invoke(keys_group, ["trust", "abc"])
    assert isinstance(bad.exception, CommonsError) and "give 64 hex characters" in str(bad.exception)


def test_switching_to_an_allowlist_keeps_trusting_this_node(home: Path) -> None:
    me = Identity.load_or_create()
    bob = Identity.generate().public_hex
    assert CliRunner().invoke(keys_group, ["trust", bob]).exit_code == 0
    assert TrustPolicy.load().trusted == {me.public_hex, bob}
    _, new, _ = rotate()
    assert TrustPolicy.load().trusted == {me.public_hex, bob, new.public_hex}
    assert TrustPolicy.load().revoked == {me.public_hex}
