"""Whose signatures we accept, and which versions we have already seen.

State lives in `home()/"trust"` (all optional):

- `trusted_keys`: one hex ed25519 public key per line (`#` starts a comment). When this file exists only
  these signers are accepted and name pinning is off. When it is absent, the first signer seen for a
  name is pinned (trust on first use, `pins.json`) and any other signer for that name is refused.
- `revoked_keys`: same format; always refused, even when trusted. `commons keys rotate` appends here.
- `versions.json`: `{name: {version: sha256 of the signed payload}}`. A version lower than the highest
  one seen is refused (rollback/replay) and a seen version with a different payload is refused
  (the publisher showed two different things under one version).
- `policy.json`: `{"max_file_size": bytes}` (default 2 GiB).

Checking never writes. `TrustPolicy.check()` is pure; `TrustPolicy.record(verified)` is the one step
that pins a name and marks a version seen. `verify_directory(..., record=True)` calls it only after every
file checked out, so a dry check (`record=False`, `commons verify --dry-run`) leaves no trace.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import CommonsError, VerifyError
from protocol.home import home

DEFAULT_MAX_FILE_SIZE = 2 * 1024**3
TRUSTED_KEYS = "trusted_keys"
REVOKED_KEYS = "revoked_keys"
PINS = "pins.json"
VERSIONS = "versions.json"
POLICY = "policy.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Formats that can run code when loaded (pickle inside); weights must be safetensors.
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill", ".npy", ".npz")
# Everything else is refused unless it is one of these kinds: safetensors weights, and the configs, cards,
# tokenizers and data around them, none of which any loader unpickles. An allowlist, not a denylist: a
# protocol-0 pickle named `weights` (no suffix) is refused for its name before its bytes are looked at.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".jsonl", ".md", ".txt", ".jinja", ".model", ".yaml", ".yml",
                    ".csv", ".tsv", ".cff", ".rst")
ALLOWED_NAMES = ("LICENSE", "NOTICE", "README", "COPYING", "AUTHORS", "CITATION")


def trust_dir() -> Path:
    return home() / "trust"


def oversize_message(name: str, size: int, limit: int) -> str:
    shown = f"{limit / 1024**3:.1f} GiB" if limit >= 1024**3 else f"{limit} bytes"
    return (
        f"{q(name)} is {size} bytes, over the {shown} limit; raise max_file_size in "
        "$COMMONS_HOME/trust/policy.json only if you trust it"
    )


def short(key_hex: str) -> str:
    return key_hex[:16] + "…" if len(key_hex) > 16 else key_hex


@dataclass
class TrustPolicy:
    """The rules one verification runs under. `TrustPolicy()` is an in-memory TOFU policy (tests, index)."""

    trusted: frozenset[str] | None = None  # None: no trusted-keys file, trust on first use
    revoked: frozenset[str] = frozenset()
    pins: dict[str, str] = field(default_factory=dict)
    versions: dict[str, dict[int, str]] = field(default_factory=dict)
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    allow_older: bool = False  # set when a caller asks for an old version on purpose (`pull name@1`)
    root: Path | None = None  # where record() persists; None keeps everything in memory

    @classmethod
    def load(cls, root: Path | None = None) -> TrustPolicy:
        root = Path(root) if root else trust_dir()
        trusted_file = root / TRUSTED_KEYS
        settings = _read_json(root / POLICY, {})
        max_size = (
            settings.get("max_file_size", DEFAULT_MAX_FILE_SIZE) if isinstance(settings, dict) else None
        )
        if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size <= 0:
            raise CommonsError(f"{root / POLICY}: max_file_size must be a positive integer of bytes")
        return cls(
            trusted=frozenset(read_key_list(trusted_file)) if trusted_file.exists() else None,
            revoked=frozenset(read_key_list(root / REVOKED_KEYS)),
            pins=_load_pins(root),
            versions=_load_versions(root),
            max_file_size=max_size,
            root=root,
        )

    def check_signer(self, name: str, signer: str) -> None:
        if signer in self.revoked:
            raise VerifyError(
                f"signer {short(signer)} is revoked; refuse this adapter or ask the publisher for one signed "
                "with their current key"
            )
        if self.trusted is not None:
            if signer not in self.trusted:
                raise VerifyError(
                    f"signer {short(signer)} is not in your trusted keys; add it with `commons keys trust "
                    "<hex>` if you trust the publisher"
                )
            return
        pinned = self.pins.get(name)
        if pinned is not None and pinned != signer:
            raise VerifyError(
                f"{q(name)} is pinned to signer {short(pinned)} (first seen) but this is signed by "
                f"{short(signer)}; refuse it, or `commons keys trust` the new key if the publisher rotated"
            )

    def check_version(self, name: str, version: int, digest: str) -> None:
        seen = self.versions.get(name, {})
        if version in seen and seen[version] != digest:
            raise VerifyError(
                f"replay refused: {q(name)} v{version} differs from the v{version} already seen; "
                "the publisher must bump the version"
            )
        newest = max(seen, default=None)
        if newest is not None and version < newest and not self.allow_older:
            raise VerifyError(
                f"replay refused: {q(name)} v{version} is older than v{newest} already seen; "
                "take the latest, or pass --allow-older if you mean this one"
            )

    def check(self, name: str, version: int, signer: str, digest: str) -> None:
        """Raise VerifyError (one line) if this signer may not publish this version of this name."""
        self.check_signer(name, signer)
        self.check_version(name, version, digest)

    def record(self, verified: Any) -> None:
        """Pin the name to its signer (TOFU) and mark the version seen; only after a full verification."""
        name, version = verified.meta.name, verified.meta.version
        signer, digest = verified.signer, verified.payload_sha256
        if self.root is None:
            self.check(name, version, signer, digest)
            self._merge(name, version, signer, digest)
            return
        with _locked(self.root):
            # Re-read under the lock: another process may have recorded something since we loaded.
            self.pins, self.versions = _load_pins(self.root), _load_versions(self.root)
            self.check(name, version, signer, digest)
            self._merge(name, version, signer, digest)
            _write_json(self.root / PINS, dict(sorted(self.pins.items())))
            _write_json(
                self.root / VERSIONS,
                {n: {str(v): d for v, d in sorted(vs.items())} for n, vs in sorted(self.versions.items())},
            )

    def _merge(self, name: str, version: int, signer: str, digest: str) -> None:
        if self.trusted is None:
            self.pins.setdefault(name, signer)
        self.versions.setdefault(name, {})[version] = digest


# --- file rules: what no signature can make acceptable ------------------------------------------------------


def name_problem(name: str) -> str | None:
    """Why a relative file name is unsafe to write anywhere, or None."""
    if not name or len(name) > 1024:
        return "empty or too long"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "control character"
    if "\\" in name:
        return "backslash"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "path traversal"
    if any(part in ("", ".") for part in parts):
        return "empty path component"
    if any(part.startswith(".") for part in parts):
        return "hidden path"
    if ":" in name:
        return "colon"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8"
    return None


def kind_problem(rel: str) -> str | None:
    """Why a file's name is not an allowed kind (see ALLOWED_SUFFIXES), or None."""
    lower = rel.lower()
    suffix = next((s for s in REFUSED_SUFFIXES if lower.endswith(s)), None)
    if suffix:
        return f"{q(rel)} is a pickle-capable format ({suffix}); only safetensors weights are accepted"
    base = rel.rsplit("/", 1)[-1]
    if lower.endswith(ALLOWED_SUFFIXES) or base in ALLOWED_NAMES:
        return None
    return (f"{q(rel)} is not a kind of file an adapter or dataset holds (weights .safetensors; text .json "
            ".jsonl .md .txt .yaml ...); remove it")


def file_rule_violation(path: Path, rel: str) -> str | None:
    """Content we refuse whatever its signature says, on any file in the folder: anything that can run code.

    What may be signed at all is narrower (`kind_problem`: an allowlist), checked where names get signed.
    """
    lower = rel.lower()
    suffix = next((s for s in REFUSED_SUFFIXES if lower.endswith(s)), None)
    if suffix:
        return f"{q(rel)} is a pickle-capable format ({suffix}); only safetensors weights are accepted"
    with open(path, "rb") as handle:
        head = handle.read(8)
        if lower.endswith(".safetensors"):
            size = len(head) == 8 and int.from_bytes(head, "little")
            if not size or size > 100 * 1024 * 1024 or 8 + size > path.stat().st_size:
                return f"{q(rel)} is not a valid safetensors file (bad header); re-export it"
            try:
                header = json.loads(handle.read(size))
            except (ValueError, RecursionError):
                header = None
            if not isinstance(header, dict):
                return f"{q(rel)} is not a valid safetensors file (bad header); re-export it"
            return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"{q(rel)} is a pickle; only safetensors weights are accepted"
    if head[:4] == b"PK\x03\x04" and _zip_holds_pickle(path):
        return (
            f"{q(rel)} is a zip holding a pickle (torch.save format); only safetensors weights are accepted"
        )
    return None


def _zip_holds_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.lower().endswith((".pkl", ".pickle")) for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


# --- key lists and state files ------------------------------------------------------------------------------


def read_key_list(path: Path) -> list[str]:
    """Hex keys from a trusted/revoked keys file; a malformed line is an error, never silently skipped."""
    if not path.exists():
        return []
    keys = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        value = line.split("#", 1)[0].strip().split()
        if not value:
            continue
        key = value[0].lower()
        if not _HEX64.fullmatch(key):
            raise CommonsError(f"line {number} of {path} is not a hex ed25519 public key; fix or delete it")
        keys.append(key)
    return keys


def trust_key(public_hex: str, note: str = "", root: Path | None = None) -> Path:
    """Append a key to the trusted-keys file (creating it switches the policy from TOFU to an allowlist)."""
    return _append_key(Path(root) if root else trust_dir(), TRUSTED_KEYS, public_hex, note)


def revoke_key(public_hex: str, note: str = "", root: Path | None = None) -> Path:
    return _append_key(Path(root) if root else trust_dir(), REVOKED_KEYS, public_hex, note)


def repin(old_hex: str, new_hex: str, root: Path | None = None) -> list[str]:
    """Move every TOFU pin from one signer to another (after this node rotated its own key)."""
    root = Path(root) if root else trust_dir()
    with _locked(root):
        pins = _load_pins(root)
        moved = sorted(name for name, key in pins.items() if key == old_hex)
        if moved:
            pins.update({name: new_hex for name in moved})
            _write_json(root / PINS, dict(sorted(pins.items())))
    return moved


def _append_key(root: Path, filename: str, public_hex: str, note: str) -> Path:
    key = public_hex.strip().lower()
    if not _HEX64.fullmatch(key):
        raise CommonsError(f"{public_hex[:80]!r} is not an ed25519 public key; give 64 hex characters")
    path = root / filename
    with _locked(root):
        if key not in read_key_list(path):
            with path.open("a", encoding="utf-8") as out:
                out.write(key + (f"  # {note}" if note else "") + "\n")
    return path


def _load_pins(root: Path) -> dict[str, str]:
    pins = _read_json(root / PINS, {})
    if not isinstance(pins, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v) for k, v in pins.items()
    ):
        raise CommonsError(f"{root / PINS} is corrupt (want {{name: hex key}}); fix or delete it")
    return pins


def _load_versions(root: Path) -> dict[str, dict[int, str]]:
    raw = _read_json(root / VERSIONS, {})
    try:
        assert isinstance(raw, dict)
        return {name: {int(v): str(d) for v, d in seen.items()} for name, seen in raw.items()}
    except (AssertionError, AttributeError, ValueError, TypeError):
        raise CommonsError(
            f"{root / VERSIONS} is corrupt (want {{name: {{version: digest}}}}); fix it"
        ) from None


def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CommonsError(f"{path} is not valid JSON; fix or delete it") from None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def q(name: str, limit: int = 60) -> str:
    """A name as it can safely appear in a one-line message: escaped, quoted, truncated."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "…" + text[0]
