"""The node's ed25519 identity (signer, libp2p peer id, index key) and the P-256 key it vouches for.

    >>> me = Identity.load_or_create()          # home()/identity/ed25519.key, mode 0600
    >>> sig = me.sign(b"hello")
    >>> verify_signature(me.public_key, b"hello", sig)
    True
    >>> me.peer_id()                            # '12D3KooW...', what libp2p computes for this key
    >>> me.p256.public_pem()                    # home()/identity/ed25519.p256.pem, made on first use

The key file holds the 32-byte ed25519 seed as 64 hex characters (the same seed libp2p's
`Ed25519PrivateKey.from_bytes` takes). Loading refuses a file that others can read, as ssh does.

Why a second key: OpenSSF's `model_signing verify key` checks ECDSA only (P-256/384/521), so the
model.sig bundle is signed by a P-256 key, and the ed25519 identity signs that key's public half
(`bundle.KeyBinding`). Trust, pins, the index and announcements still name the ed25519 key. The P-256 key
file (PKCS#8 PEM, mode 0600) sits beside the ed25519 one and `rotate` archives both. Its signatures have
one accepted form each: strict DER with S in the lower half of the group order, so nobody can turn one
valid signature into its (r, n - s) twin.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from nacl.signing import SigningKey, VerifyKey

from protocol.content.multiformats import b58encode
from protocol.errors import CommonsError
from protocol.home import home

KEY_FILE = "ed25519.key"
P256_SUFFIX = ".p256.pem"  # ed25519.key -> ed25519.p256.pem, in the same folder
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# libp2p PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
_LIBP2P_ED25519_PREFIX = b"\x08\x01\x12\x20"
_IDENTITY_MULTIHASH = 0x00


def default_key_path() -> Path:
    return home() / "identity" / KEY_FILE


def p256_path(key_path: Path) -> Path:
    """Where the P-256 key of the ed25519 key file `key_path` lives."""
    return Path(key_path).with_suffix(P256_SUFFIX)


def parse_public_hex(text: str) -> bytes:
    """A public key given as 64 lowercase-or-uppercase hex characters, as bytes."""
    value = text.strip().lower()
    if not _HEX64.fullmatch(value):
        raise CommonsError(f"{text[:80]!r} is not an ed25519 public key; give 64 hex characters")
    return bytes.fromhex(value)


def peer_id_from_public_key(public_key: bytes) -> str:
    """libp2p peer id of an ed25519 key: identity multihash of the protobuf key, base58btc."""
    if len(public_key) != 32:
        raise CommonsError("an ed25519 public key is 32 bytes; check the key you passed")
    encoded = _LIBP2P_ED25519_PREFIX + public_key
    return b58encode(bytes([_IDENTITY_MULTIHASH, len(encoded)]) + encoded)


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True only for a valid ed25519 signature; any malformed input is just False, never an exception."""
    try:
        VerifyKey(bytes(public_key)).verify(bytes(data), bytes(signature))
    except Exception:  # noqa: BLE001 - bad key, bad point, bad signature: all mean "not verified"
        return False
    return True


def p256_public_key(der: bytes) -> ec.EllipticCurvePublicKey | None:
    """A P-256 public key from its SubjectPublicKeyInfo DER, or None unless it is exactly that encoding."""
    try:
        key = serialization.load_der_public_key(bytes(der))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    return key if _spki_der(key) == bytes(der) else None


def verify_p256(public_der: bytes, data: bytes, signature: bytes) -> bool:
    """True only for a valid ECDSA-P256-SHA256 signature in strict DER with a low S; else False."""
    key = p256_public_key(public_der)
    try:
        r, s = decode_dss_signature(bytes(signature))
    except ValueError:
        return False
    if key is None or not 0 < s <= _P256_ORDER // 2 or encode_dss_signature(r, s) != bytes(signature):
        return False
    try:
        key.verify(bytes(signature), bytes(data), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def pem_of(public_der: bytes) -> bytes:
    """The PEM text of a P-256 public key given as DER (what `model_signing --public_key` reads)."""
    return serialization.load_der_public_key(bytes(public_der)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class P256Key:
    """An ECDSA P-256 signing key and where it lives on disk (if anywhere)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, path: Path | None = None) -> None:
        self._key = private_key
        self.path = path

    @classmethod
    def generate(cls) -> P256Key:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def load(cls, path: Path) -> P256Key:
        path = Path(path)
        _check_private(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise CommonsError(f"{path} is not an unencrypted P-256 key (PEM); delete it to make a new one")
        return cls(key, path)

    @classmethod
    def load_or_create(cls, path: Path) -> P256Key:
        path = Path(path)
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        try:
            key.save(path)
        except CommonsError:  # another process made it meanwhile: use theirs
            return cls.load(path)
        return key

    def save(self, path: Path) -> None:
        """Write the key as PKCS#8 PEM with mode 0600, atomically, refusing to overwrite a key."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_private(Path(path), pem.decode("ascii"))
        self.path = Path(path)

    @property
    def public_der(self) -> bytes:
        return _spki_der(self._key.public_key())

    def public_pem(self) -> bytes:
        return pem_of(self.public_der)

    def sign(self, data: bytes) -> bytes:
        """ECDSA-SHA256 in DER, S made low: the one form `verify_p256` accepts."""
        r, s = decode_dss_signature(self._key.sign(bytes(data), ec.ECDSA(hashes.SHA256())))
        return encode_dss_signature(r, min(s, _P256_ORDER - s))


class Identity:
    """An ed25519 signing key and where it lives on disk (if anywhere), with its P-256 key."""

    def __init__(self, signing_key: SigningKey, path: Path | None = None) -> None:
        self._key = signing_key
        self.path = path
        self._p256: P256Key | None = None

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes, path: Path | None = None) -> Identity:
        if len(seed) != 32:
            raise CommonsError("an ed25519 seed is 32 bytes; check the key file")
        return cls(SigningKey(seed), path)

    @classmethod
    def load(cls, path: Path | None = None) -> Identity:
        path = Path(path) if path else default_key_path()
        if not path.is_file():
            raise CommonsError(f"no identity key at {path}; create one with `commons keys show`")
        _check_private(path)
        text = path.read_text(encoding="ascii", errors="replace").strip()
        if not _HEX64.fullmatch(text):
            raise CommonsError(
                f"{path} is not an ed25519 key file (64 hex characters); restore it from a backup"
            )
        return cls.from_seed(bytes.fromhex(text), path)

    @classmethod
    def load_or_create(cls, path: Path | None = None) -> Identity:
        path = Path(path) if path else default_key_path()
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity

    def save(self, path: Path) -> None:
        """Write the seed with mode 0600, atomically, refusing to overwrite an existing key."""
        path = Path(path)
        _write_private(path, self._key.encode().hex() + "\n")
        self.path = path
        if self._p256 is not None:  # a key already used in memory must be the one kept
            self._p256.save(p256_path(path))

    @property
    def p256(self) -> P256Key:
        """The P-256 key that signs model.sig bundles: beside the key file, made on first use."""
        if self._p256 is None:
            self._p256 = P256Key.load_or_create(p256_path(self.path)) if self.path else P256Key.generate()
        return self._p256

    @property
    def public_key(self) -> bytes:
        return bytes(self._key.verify_key)

    @property
    def public_hex(self) -> str:
        return self.public_key.hex()

    @property
    def secret_seed(self) -> bytes:
        """The 32-byte seed (what the key file holds); handle with care."""
        return bytes(self._key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data)).signature

    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def libp2p_key_pair(self):  # -> libp2p.crypto.keys.KeyPair (imported lazily: libp2p is heavy)
        from libp2p.crypto.ed25519 import create_new_key_pair

        return create_new_key_pair(self.secret_seed)

    def __repr__(self) -> str:
        return f"Identity(public_hex={self.public_hex!r}, path={str(self.path) if self.path else None!r})"


def rotate(path: Path | None = None) -> tuple[Identity, Identity, Path]:
    """Archive the current key with a timestamp, create a new one and revoke the old public key.

    Names pinned (trust on first use) to the old key are re-pinned to the new one, since this node is the
    one that rotated. Returns (old, new, archive_path).
    """
    from protocol.signing import trust  # trust does not import keys; importing here keeps the graph one-way

    path = Path(path) if path else default_key_path()
    old = Identity.load(path)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    archive = path.parent / "archive" / f"{path.stem}-{stamp}{path.suffix}"
    archive.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, archive)
    if p256_path(path).exists():  # the P-256 key goes with the identity that vouched for it
        os.replace(p256_path(path), p256_path(archive))
    new = Identity.generate()
    new.save(path)
    trust.revoke_key(old.public_hex, note=f"rotated {stamp}, replaced by {new.public_hex}")
    trust.repin(old.public_hex, new.public_hex)
    if (trust.trust_dir() / trust.TRUSTED_KEYS).exists():  # allowlist mode: keep accepting our own work
        trust.trust_key(new.public_hex, note=f"this node, rotated {stamp}")
    return old, new, archive


def _spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_private(path: Path, text: str) -> None:
    """Create `path` with mode 0600 holding `text`, atomically; never clobber an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(text)
    try:
        os.link(tmp, path)  # fails if a key appeared meanwhile: never clobber someone's identity
    except FileExistsError:
        raise CommonsError(f"{path} already exists; remove it first if you mean to replace it") from None
    finally:
        tmp.unlink()


def _check_private(path: Path) -> None:
    if sys.platform == "win32":
        return
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CommonsError(f"{path} is readable by other users; run `chmod 600 {path}`")


def fingerprint(openssh_key: str) -> str:
    """`ssh-keygen -l` style: SHA256 of an OpenSSH public key's blob, unpadded base64. A volunteer's
    `commons node key` and the admin's `commons coordinator admit` print the same one for a SuperNode key."""
    blob = base64.b64decode(openssh_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
