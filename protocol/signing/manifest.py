"""Signed adapter manifests: OpenSSF model_signing v1.0 in-toto statements in a Sigstore bundle.

    >>> me = Identity.load_or_create()
    >>> sign_directory(Path("out/adapter"), AdapterMeta(name="gsm8k-smollm2", version=1), me)
    >>> verify_directory(Path("out/adapter")).meta.version       # re-hashes every file, fails closed
    1

`DIR/model.sig` holds a Sigstore bundle v0.3 (`bundle.py`): a DSSE envelope signed by the identity's
P-256 key, which `model_signing verify key --public_key <commons keys export --pem>` accepts too. Its
payload is an in-toto Statement v1 whose subject digest is the sha256 over the sorted per-file sha256
digests (as model_signing computes it), whose predicate lists every file under `resources` and carries
our metadata, file sizes, CIDv0s and the ed25519 identity's word for the P-256 key under `commons`.
A model.sig from before bundles (a bare DSSE envelope signed by ed25519) still verifies.

What is covered: every regular file under DIR except `model.sig` and hidden paths (any component
starting with '.'), which `ipfs add -r` also leaves out, so a directory pulled by CID verifies. What is
left out is said, not implied: `serialization.ignore_paths` lists `model.sig` and every hidden path the
signer skipped, and a hidden path on disk that it does not list is refused like any unsigned file.
model_signing hashes every file but those paths, so both tools check the same files; it also always
skips .git, .gitattributes, .github and .gitignore, which we refuse when they appear after signing.
What is refused, always: symlinks anywhere, file kinds outside the allowlist (weights must be
safetensors; no pickles, whatever their name), unsafe names, folders that would be published without a
signed file in them, files over the size limit, anything not byte-identical, control characters in the
metadata's strings.

Recording: `verify_directory(record=True)` (the default) pins the signer and marks the version seen once
everything checked out; pass `record=False` for a dry check. `verify_envelope` never records by default.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol.content import unixfs
from protocol.errors import CommonsError, VerifyError
from protocol.signing.bundle import KeyBinding, open_signature, sign_bundle
from protocol.signing.dsse import canonical_json, envelope_bytes, exact_keys, parse_canonical
from protocol.signing.keys import Identity
from protocol.signing.trust import (
    DEFAULT_MAX_FILE_SIZE,
    TrustPolicy,
    file_rule_violation,
    kind_problem,
    name_problem,
    oversize_message,
    q,
)

SIGNATURE_FILE = "model.sig"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
SERIALIZATION = {
    "method": "files",
    "hash_type": "sha256",
    "allow_symlinks": False,
    "ignore_paths": [SIGNATURE_FILE],
}


MAX_IGNORED = 1000  # hidden paths one signature may list as left out
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CIDV0 = re.compile(r"^Qm[1-9A-HJ-NP-Za-km-z]{44}$")


def iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class AdapterMeta:
    name: str
    version: int = 1
    kind: str = "adapter"  # "adapter" | "dataset"
    base_model: str = ""
    base_revision: str = ""
    lora_config: dict = field(default_factory=dict)
    campaign: str = ""
    rounds: int = 0
    contributors: list[str] = field(default_factory=list)  # hex ed25519 public keys
    datasets: list[dict] = field(default_factory=list)  # {cid, name, license}
    eval: dict = field(default_factory=dict)  # accuracy_base, accuracy_adapter, curve, ...
    license: str = "NOASSERTION"  # SPDX id
    previous: str | None = None  # CID of the previous version
    created: str = field(default_factory=iso_now)  # ISO 8601 UTC
    expires: str | None = None
    ledger: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "model.sig commons", error: type = VerifyError) -> AdapterMeta:
        """Strict: exact fields, exact JSON types, sane values; `error` is raised with one line."""
        try:
            exact_keys(data, {f.name for f in fields(cls)}, where)
        except VerifyError as exc:
            raise error(str(exc)) from None
        for key, (kinds, item) in _META_TYPES.items():
            value = data[key]
            if not _is(value, kinds) or (item and not all(_is(v, (item,)) for v in value)):
                wanted = " or ".join(_TYPE_NAMES[k] for k in kinds) + (
                    f" of {_TYPE_NAMES[item].split()[-1]}s" if item else ""
                )
                raise error(f"{where}.{key} must be {wanted}; it is not a manifest we made")
        problem = _meta_problem(data)
        if problem:
            raise error(f"{where}.{problem}")
        return cls(**data)


_TYPE_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list", type(None): "null"}
_META_TYPES: dict[str, tuple[tuple[type, ...], type | None]] = {
    "name": ((str,), None),
    "version": ((int,), None),
    "kind": ((str,), None),
    "base_model": ((str,), None),
    "base_revision": ((str,), None),
    "lora_config": ((dict,), None),
    "campaign": ((str,), None),
    "rounds": ((int,), None),
    "contributors": ((list,), str),
    "datasets": ((list,), dict),
    "eval": ((dict,), None),
    "license": ((str,), None),
    "previous": ((str, type(None)), None),
    "created": ((str,), None),
    "expires": ((str, type(None)), None),
    "ledger": ((list,), dict),
}


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    return type(value) in kinds  # exact: a bool is not an int here


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_PLAIN = ("kind", "base_model", "base_revision", "campaign", "license", "previous", "created", "expires")


def _control_problem(data: dict) -> str | None:
    """Control, line-separator and bidi characters in the strings a terminal or a snippet shows."""
    for key in _PLAIN:
        if isinstance(data[key], str) and _CONTROL.search(data[key]):
            return f"{key} must not hold control characters"
    if any(_CONTROL.search(c) for c in data["contributors"]):
        return "contributors must not hold control characters"
    for item in data["datasets"]:
        if any(isinstance(v, str) and _CONTROL.search(v) for v in item.values()):
            return "datasets must not hold control characters"
    return None


def _meta_problem(data: dict) -> str | None:
    control = _control_problem(data)
    if control:
        return control
    if not _NAME.fullmatch(data["name"]):
        return "name must be 1-100 letters, digits, '.', '_' or '-' (starting with a letter or digit)"
    if data["version"] < 1 or data["version"] >= 2**53:
        return "version must be a positive integer"
    if data["kind"] not in ("adapter", "dataset"):
        return "kind must be 'adapter' or 'dataset'"
    if data["rounds"] < 0:
        return "rounds must not be negative"
    if not data["license"].strip() or len(data["license"]) > 200:
        return "license must be an SPDX expression such as Apache-2.0 or MIT AND CC-BY-4.0 (or NOASSERTION)"
    for key in ("created", "expires"):
        if data[key] is not None and _time(data[key]) is None:
            return f"{key} must be an ISO 8601 UTC time like 2026-01-31T12:00:00Z"
    return None


def _time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


@dataclass(frozen=True)
class Verified:
    meta: AdapterMeta
    signer: str  # hex ed25519 public key
    files: list[dict]  # [{name, size, sha256, cid}] sorted by name
    digest: str = ""  # subject digest: sha256 over the sorted file digests
    payload_sha256: str = ""  # sha256 of the signed statement: what versions.json remembers
    ignored: tuple[str, ...] = ()  # hidden paths the signer left out (ignore_paths, less model.sig)


def root_digest(resources: list[dict]) -> str:
    """model_signing v1.0 subject digest: sha256 over the raw per-file digests in name order."""
    hasher = hashlib.sha256()
    for resource in resources:
        hasher.update(bytes.fromhex(resource["digest"]))
    return hasher.hexdigest()


@dataclass(frozen=True)
class _Parsed:
    meta: AdapterMeta
    files: list[dict]
    digest: str
    ignored: tuple[str, ...]


def parse_statement(payload: bytes, max_file_size: int, bundled: bool = True) -> _Parsed:
    """The in-toto statement, checked field by field; VerifyError naming the first problem.

    `bundled`: it came in a bundle, so `commons.signer` (checked by `open_signature`) must be there;
    a bare ed25519 envelope's statement has none.
    """
    statement = parse_canonical(payload, "model.sig payload")
    exact_keys(statement, {"_type", "subject", "predicateType", "predicate"}, "model.sig payload")
    _require(statement["_type"] == STATEMENT_TYPE, f"model.sig _type must be {STATEMENT_TYPE}")
    _require(
        statement["predicateType"] == PREDICATE_TYPE, f"model.sig predicateType must be {PREDICATE_TYPE}"
    )
    subjects = statement["subject"]
    _require(type(subjects) is list and len(subjects) == 1, "model.sig must have exactly one subject")
    exact_keys(subjects[0], {"name", "digest"}, "model.sig subject")
    exact_keys(subjects[0]["digest"], {"sha256"}, "model.sig subject digest")
    predicate = statement["predicate"]
    exact_keys(predicate, {"serialization", "resources", "commons"}, "model.sig predicate")
    ignored = _parse_serialization(predicate["serialization"])
    resources = predicate["resources"]
    _require(type(resources) is list, "model.sig resources must be a list")
    previous = None
    for resource in resources:
        exact_keys(resource, {"name", "algorithm", "digest"}, "model.sig resource")
        name = resource["name"]
        _require(type(name) is str, "model.sig resource name must be a string")
        problem = name_problem(name)
        _require(problem is None, f"unsafe file name {q(name)} in model.sig ({problem}); refuse this adapter")
        _require(resource["algorithm"] == "sha256", "model.sig resource algorithm must be sha256")
        _require(_hex64(resource["digest"]), f"model.sig digest of {q(name)} must be 64 lowercase hex")
        _require(name != SIGNATURE_FILE, "model.sig cannot list itself as a resource")
        kind = kind_problem(name)
        _require(kind is None, f"{kind}; refuse this adapter")
        _require(name != previous, f"duplicate resource name {q(name)} in model.sig; refuse this adapter")
        _require(previous is None or name > previous, "model.sig resources must be sorted by name")
        previous = name
    digest = subjects[0]["digest"]["sha256"]
    _require(
        _hex64(digest) and digest == root_digest(resources),
        "model.sig subject digest does not match its files",
    )
    _require(bool(resources), "model.sig lists no files; refuse this adapter")
    commons = predicate["commons"]
    _require(type(commons) is dict, "model.sig predicate.commons must be a JSON object")
    _require("files" in commons, "model.sig predicate.commons is missing the field 'files'")
    commons = dict(commons)
    if bundled:
        _require("signer" in commons, "model.sig predicate.commons is missing the field 'signer'")
        commons.pop("signer")
    files = _parse_files(commons.pop("files"), resources, max_file_size)
    meta = AdapterMeta.from_dict(commons, "model.sig commons")
    _require(subjects[0]["name"] == meta.name, "model.sig subject name differs from commons.name")
    return _Parsed(meta, files, digest, ignored)


def _parse_serialization(serialization: Any) -> tuple[str, ...]:
    """The hidden paths the signer left out; the rest of `serialization` is fixed."""
    exact_keys(serialization, set(SERIALIZATION), "model.sig serialization")
    fixed = {key: serialization[key] for key in SERIALIZATION if key != "ignore_paths"}
    _require(
        canonical_json(fixed)
        == canonical_json({k: v for k, v in SERIALIZATION.items() if k != "ignore_paths"}),
        "model.sig serialization must be files/sha256 without symlinks",
    )
    paths = serialization["ignore_paths"]
    _require(
        type(paths) is list and all(type(p) is str for p in paths) and paths == sorted(set(paths))
        and SIGNATURE_FILE in paths and len(paths) <= MAX_IGNORED,
        "model.sig serialization.ignore_paths must be a sorted list of paths holding model.sig",
    )
    for path in paths:
        _require(path == SIGNATURE_FILE or hidden_top(path),
                 f"model.sig may ignore only model.sig and hidden paths, not {q(path)}; refuse this adapter")
    return tuple(p for p in paths if p != SIGNATURE_FILE)


def hidden_top(path: str) -> bool:
    """A safe relative path whose last component, and only that one, is hidden ('.git', 'eval/.cache')."""
    parts = path.split("/")
    if parts[-1] in (".", "..") or not parts[-1].startswith(".") or len(parts[-1]) < 2:
        return False
    return name_problem("/".join([*parts[:-1], "x" + parts[-1][1:]])) is None


def _parse_files(entries: Any, resources: list[dict], max_file_size: int) -> list[dict]:
    _require(
        type(entries) is list and len(entries) == len(resources),
        "model.sig commons.files must match resources",
    )
    files = []
    for entry, resource in zip(entries, resources, strict=True):
        exact_keys(entry, {"name", "size", "cid"}, "model.sig commons.files entry")
        name, size, cid = entry["name"], entry["size"], entry["cid"]
        _require(name == resource["name"], "model.sig commons.files must list the same names as resources")
        _require(
            type(size) is int and size >= 0, f"model.sig size of {q(name)} must be a non-negative integer"
        )
        _require(size <= max_file_size, oversize_message(name, size, max_file_size))
        _require(
            type(cid) is str and bool(_CIDV0.fullmatch(cid)),
            f"model.sig cid of {q(name)} must be a CIDv0 (Qm...)",
        )
        files.append({"name": name, "size": size, "sha256": resource["digest"], "cid": cid})
    return files


def _hex64(value: Any) -> bool:
    return type(value) is str and bool(_HEX64.fullmatch(value))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise VerifyError(message)


# --- files on disk ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scan:
    names: list[str]  # files the manifest covers, sorted
    skipped: list[str]  # topmost hidden paths, left out (and listed as ignored), sorted
    bare: list[str]  # folders `ipfs add -r` would publish with no covered file in them, sorted


def scan_directory(directory: Path, max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> list[str]:
    """Relative posix paths of the files a manifest covers, sorted; refuses anything unsafe."""
    return survey(directory, max_file_size).names


def survey(directory: Path, max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> Scan:
    """What a manifest covers, what it leaves out, and folders it cannot cover; refuses anything unsafe."""
    directory = Path(directory)
    names: list[str] = []
    skipped: list[str] = []
    folders: list[str] = []
    for root, dirs, files in os.walk(directory, followlinks=False, onerror=_walk_error):
        base = Path(root)
        for entry in sorted(dirs) + sorted(files):
            path = base / entry
            rel = path.relative_to(directory).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                raise VerifyError(
                    f"{q(rel)} is a symlink; symlinks are refused, replace it with the real file"
                )
            parts = rel.split("/")
            if any(part.startswith(".") for part in parts):
                if entry.startswith(".") and not any(part.startswith(".") for part in parts[:-1]):
                    skipped.append(rel)  # `ipfs add -r` skips hidden paths: said in ignore_paths
                continue
            if entry in dirs:
                folders.append(rel)
                continue
            if rel == SIGNATURE_FILE:
                continue
            if not stat.S_ISREG(info.st_mode):
                raise VerifyError(f"{q(rel)} is not a regular file; remove it")
            problem = name_problem(rel)
            if problem:
                raise VerifyError(f"unsafe file name {q(rel)} ({problem}); rename it")
            if info.st_size > max_file_size:
                raise VerifyError(oversize_message(rel, info.st_size, max_file_size))
            try:
                violation = file_rule_violation(path, rel)
            except OSError as exc:
                raise VerifyError(f"cannot read {q(rel)} ({exc.strerror}); fix its permissions") from None
            if violation:
                raise VerifyError(violation)
            names.append(rel)
    holding = {name.rsplit("/", i)[0] for name in names for i in range(1, name.count("/") + 1)}
    return Scan(sorted(names), sorted(skipped), sorted(set(folders) - holding))


def describe_files(directory: Path, names: list[str], progress: bool = False) -> list[dict]:
    """sha256, size and CIDv0 of each file, in one read per file."""
    from tqdm import tqdm

    total = sum((Path(directory) / name).lstat().st_size for name in names)
    out = []
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="hashing",
        disable=not progress or total < 64 << 20,
        leave=False,
    ) as bar:
        for name in names:
            try:
                with open(Path(directory) / name, "rb") as handle:
                    reader = _HashingReader(handle, bar)
                    cid = unixfs.import_file(reader, 0)
            except OSError as exc:
                raise VerifyError(
                    f"cannot read {q(name)} ({exc.strerror}); re-download the adapter"
                ) from None
            out.append({"name": name, "size": reader.size, "sha256": reader.sha.hexdigest(), "cid": cid})
    return out


class _HashingReader:
    """Feeds unixfs.import_file while hashing the same bytes, so each file is read once."""

    def __init__(self, handle: Any, bar: Any) -> None:
        self.handle, self.bar, self.sha, self.size = handle, bar, hashlib.sha256(), 0

    def readinto(self, view: memoryview) -> int:
        got = self.handle.readinto(view)
        if got:
            self.sha.update(view[:got])
            self.size += got
            self.bar.update(got)
        return got or 0


# --- signing ------------------------------------------------------------------------------------------------


def build_statement(
    meta: AdapterMeta,
    files: list[dict],
    ignored: list[str] | tuple[str, ...] = (),
    signer: KeyBinding | None = None,
) -> dict:
    """The statement over `files`; `signer` (the P-256 key binding) goes in for a bundle, not an envelope."""
    files = sorted(files, key=lambda f: f["name"])
    serialization = {**SERIALIZATION, "ignore_paths": sorted({SIGNATURE_FILE, *ignored})}
    resources = [{"name": f["name"], "algorithm": "sha256", "digest": f["sha256"]} for f in files]
    commons = meta.to_dict() | {
        "files": [{"name": f["name"], "size": f["size"], "cid": f["cid"]} for f in files]
    }
    if signer is not None:
        commons["signer"] = signer.to_dict()
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": meta.name, "digest": {"sha256": root_digest(resources)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"serialization": serialization, "resources": resources, "commons": commons},
    }


def sign_directory(
    directory: Path,
    meta: AdapterMeta,
    identity: Identity,
    *,
    progress: bool = False,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
) -> dict:
    """Hash every file, sign the statement, write DIR/model.sig; returns the bundle (a dict)."""
    directory = _check_dir(directory)
    AdapterMeta.from_dict(meta.to_dict(), "adapter metadata", error=CommonsError)  # same rules as verify
    scan = survey(directory, max_file_size)
    if not scan.names:
        raise CommonsError(f"{directory} has no files to sign; point at the adapter folder")
    kind = next((problem for name in scan.names if (problem := kind_problem(name))), None)
    if kind:
        raise CommonsError(kind)
    if scan.bare:
        raise CommonsError(f"folder {q(scan.bare[0])} holds no file to sign, yet `ipfs add -r` would "
                           "publish it and pull would refuse it; remove it or put a file in it")
    if len(scan.skipped) > MAX_IGNORED:
        raise CommonsError(f"{directory} holds over {MAX_IGNORED} hidden paths; "
                           "sign a folder with the adapter only")
    odd = next((path for path in scan.skipped if not hidden_top(path)), None)
    if odd is not None:  # it would be listed as ignored, and that list is refused with an unsafe name in it
        raise CommonsError(f"hidden path {q(odd)} has an unsafe name; rename or remove it")
    files = describe_files(directory, scan.names, progress)
    statement = build_statement(meta, files, scan.skipped, KeyBinding.of(identity))
    try:
        payload = canonical_json(statement)
    except (ValueError, TypeError):
        raise CommonsError(
            "adapter metadata holds NaN/Infinity, a numpy number or other non-JSON value; "
            "convert it with float()/int()/str()"
        ) from None
    bundle = sign_bundle(payload, identity)
    data = envelope_bytes(bundle)
    verify_envelope(
        data, TrustPolicy(max_file_size=max_file_size)
    )  # never write a signature we would refuse ourselves
    tmp = directory / f".{SIGNATURE_FILE}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, directory / SIGNATURE_FILE)
    return bundle


# --- verifying ----------------------------------------------------------------------------------------------


def verify_envelope(envelope: bytes, policy: TrustPolicy | None = None, *, record: bool = False) -> Verified:
    """Structure, signatures, expiry and trust of model.sig's bytes (bundle or bare envelope), no files."""
    policy = policy if policy is not None else TrustPolicy.load()
    if not isinstance(envelope, (bytes, bytearray, memoryview)):
        raise VerifyError("model.sig must be given as bytes; read the file in binary mode")
    payload, signer, bundled = open_signature(bytes(envelope))
    parsed = parse_statement(payload, policy.max_file_size, bundled)
    meta = parsed.meta
    if meta.expires is not None and _time(meta.expires) <= datetime.now(UTC):
        raise VerifyError(
            f"the manifest for {q(meta.name)} v{meta.version} expired at {meta.expires[:40]}; "
            "ask the publisher for a re-signed version"
        )
    payload_sha256 = hashlib.sha256(payload).hexdigest()
    policy.check(meta.name, meta.version, signer, payload_sha256)
    verified = Verified(meta, signer, parsed.files, parsed.digest, payload_sha256, parsed.ignored)
    if record:
        policy.record(verified)
    return verified


def verify_directory(
    directory: Path, policy: TrustPolicy | None = None, *, record: bool = True, progress: bool = False
) -> Verified:
    """Check model.sig and re-hash every file on disk; VerifyError (one line) on any problem."""
    directory = _check_dir(directory)
    sig = directory / SIGNATURE_FILE
    if sig.is_symlink() or not sig.is_file():
        raise VerifyError(f"no {SIGNATURE_FILE} in {q(str(directory), 80)}; sign it with `commons sign DIR`")
    policy = policy if policy is not None else TrustPolicy.load()
    verified = verify_envelope(sig.read_bytes(), policy)
    scan = survey(directory, policy.max_file_size)
    unlisted = sorted(set(scan.skipped) - set(verified.ignored))
    if unlisted:
        raise VerifyError(
            f"{q(unlisted[0])} is not covered by {SIGNATURE_FILE} (nor listed as ignored); "
            "remove it or re-sign"
        )
    on_disk = scan.names
    expected = {f["name"]: f for f in verified.files}
    missing = sorted(expected.keys() - set(on_disk))
    if missing:
        raise VerifyError(
            f"{q(missing[0])} is listed in {SIGNATURE_FILE} but missing; re-download the adapter"
        )
    extra = sorted(set(on_disk) - expected.keys())
    if extra:
        raise VerifyError(
            f"{q(extra[0])} is not covered by {SIGNATURE_FILE}; remove it or re-sign the folder"
        )
    for name in on_disk:
        if (directory / name).stat().st_size != expected[name]["size"]:
            raise VerifyError(f"{q(name)} was modified after signing (size differs); re-download the adapter")
    for actual in describe_files(directory, on_disk, progress):
        want = expected[actual["name"]]
        for key in ("size", "sha256", "cid"):
            if actual[key] != want[key]:
                raise VerifyError(
                    f"{q(actual['name'])} was modified after signing ({key} differs); re-download the adapter"
                )
    if record:
        policy.record(verified)
    return verified


def _check_dir(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CommonsError(f"no such directory: {q(str(directory), 80)}; check the path")
    return directory


def _walk_error(exc: OSError) -> None:
    raise VerifyError(f"cannot read {q(str(exc.filename), 80)} ({exc.strerror}); fix its permissions")
