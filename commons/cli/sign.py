"""`commons sign DIR` writes DIR/model.sig (a Sigstore bundle); `commons verify DIR|CID` re-checks it all."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from commons.cli.output import emit
from protocol.errors import CommonsError
from protocol.signing.bundle import payload_of
from protocol.signing.keys import Identity, peer_id_from_public_key
from protocol.signing.manifest import SIGNATURE_FILE, AdapterMeta, Verified, sign_directory, verify_directory
from protocol.signing.trust import TrustPolicy

# adapter_config.json keys worth repeating in the signed metadata (the whole file is signed anyway)
_LORA_KEYS = (
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "use_rslora",
)


def _adapter_config(directory: Path) -> dict:
    path = directory / "adapter_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CommonsError(f"{path} is not valid JSON; fix it or re-save the adapter") from None
    return config if isinstance(config, dict) else {}


def _previous_version(directory: Path) -> int | None:
    """Version in an existing model.sig, read without verifying: only used to suggest the next one."""
    try:
        document = json.loads((directory / SIGNATURE_FILE).read_bytes())
        version = json.loads(payload_of(document))["predicate"]["commons"]["version"]
    except Exception:  # noqa: BLE001 - absent or unreadable: no suggestion
        return None
    return version if type(version) is int else None


def _default_name(directory: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", directory.resolve().name).strip("-._")
    if not name:
        raise CommonsError(f"cannot make an adapter name from {directory}; pass --name")
    return name[:100]


@click.command("sign")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--name", help="Adapter name (default: the folder name).")
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    help="Version number (default: one more than the existing model.sig, else 1).",
)
@click.option("--license", "license_", help="SPDX license id, e.g. Apache-2.0 (default: NOASSERTION).")
@click.option("--base-model", help="Base model (default: base_model_name_or_path from adapter_config.json).")
@click.option(
    "--kind",
    type=click.Choice(["adapter", "dataset"]),
    default="adapter",
    show_default=True,
    help="What the folder holds.",
)
@click.option("--previous", help="CID of the previous version.")
@click.option("--expires-days", type=click.IntRange(min=1), help="Make the signature expire after N days.")
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Identity key file (default: $COMMONS_HOME/identity/ed25519.key).",
)
@click.option("--json", "as_json", is_flag=True, help="Print {name, version, signer, files, path} as JSON.")
def sign_command(
    directory: Path,
    name: str | None,
    version: int | None,
    license_: str | None,
    base_model: str | None,
    kind: str,
    previous: str | None,
    expires_days: int | None,
    key_path: Path | None,
    as_json: bool,
) -> None:
    """Sign every file in DIRECTORY with your key; writes DIRECTORY/model.sig.

    model.sig is a Sigstore bundle that OpenSSF's model_signing also checks:
    `commons keys export --pem > key.pub` then
    `model_signing verify key --signature DIRECTORY/model.sig --public_key key.pub DIRECTORY`.

    Example: commons sign out/adapter --license Apache-2.0
    """
    if not directory.is_dir():
        raise CommonsError(f"no such directory: {directory}; check the path")
    config = _adapter_config(directory)
    revision = config.get("revision")
    now = datetime.now(UTC).replace(microsecond=0)
    meta = AdapterMeta(
        name=name or _default_name(directory),
        version=version or (_previous_version(directory) or 0) + 1,
        kind=kind,
        base_model=base_model or str(config.get("base_model_name_or_path") or ""),
        base_revision=revision if isinstance(revision, str) else "",
        lora_config={k: config[k] for k in _LORA_KEYS if k in config},
        license=license_ or "NOASSERTION",
        previous=previous,
        created=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        expires=(now + timedelta(days=expires_days)).strftime("%Y-%m-%dT%H:%M:%SZ") if expires_days else None,
    )
    identity = Identity.load(key_path) if key_path else Identity.load_or_create()
    bundle = sign_directory(directory, meta, identity, progress=sys.stderr.isatty())
    files = len(json.loads(payload_of(bundle))["predicate"]["resources"])
    info = {
        "name": meta.name,
        "version": meta.version,
        "signer": identity.public_hex,
        "files": files,
        "path": str(directory / SIGNATURE_FILE),
    }
    emit(as_json, info, f"signed {meta.name} v{meta.version} ({files} files) with "
                        f"{identity.public_hex[:16]}…: {info['path']}")


def _report(verified: Verified, target: str) -> dict[str, Any]:
    meta = verified.meta
    return {
        "ok": True,
        "target": target,
        "name": meta.name,
        "version": meta.version,
        "kind": meta.kind,
        "signer": verified.signer,
        "signer_peer_id": peer_id_from_public_key(bytes.fromhex(verified.signer)),
        "base_model": meta.base_model,
        "license": meta.license,
        "created": meta.created,
        "expires": meta.expires,
        "digest": verified.digest,
        "files": len(verified.files),
        "bytes": sum(f["size"] for f in verified.files),
    }


def _verify_cid(cid: str, policy: TrustPolicy, record: bool, progress: bool) -> Verified:
    from protocol.content.blockstore import BlockStore
    from protocol.content.multiformats import CID

    try:
        CID.decode(cid)
    except Exception:  # noqa: BLE001 - any decoding failure means "not a CID"
        raise CommonsError(f"{cid[:80]!r} is neither a directory nor a CID; check the argument") from None
    store = BlockStore()
    if not store.has(cid):
        raise CommonsError(f"{cid} is not in the local block store; fetch it with `commons pull {cid}`")
    with tempfile.TemporaryDirectory(prefix="commons-verify-") as tmp:
        out = Path(tmp) / "adapter"
        store.export(cid, out)
        if not out.is_dir():
            raise CommonsError(f"{cid} is a single file, not a signed folder; verify the folder's CID")
        return verify_directory(out, policy, record=record, progress=progress)


@click.command("verify")
@click.argument("target")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the verified metadata (or {ok: false, error}) as JSON."
)
@click.option("--dry-run", is_flag=True, help="Check only: do not pin the signer or mark the version seen.")
@click.option(
    "--allow-older", is_flag=True, help="Accept a version older than one already seen (on purpose)."
)
def verify_command(target: str, as_json: bool, dry_run: bool, allow_older: bool) -> None:
    """Verify a signed folder (or a CID in the local block store): every file and the signature.

    Exits 0 when everything checks out, else 1 with one line naming what failed.
    """
    progress = sys.stderr.isatty()
    try:
        policy = TrustPolicy.load()
        policy.allow_older = allow_older
        if os.path.lexists(target):
            verified = verify_directory(Path(target), policy, record=not dry_run, progress=progress)
        else:
            verified = _verify_cid(target, policy, not dry_run, progress)
    except CommonsError as exc:
        emit(as_json, {"ok": False, "target": target, "error": str(exc)}, None)  # the error line is main()'s
        raise
    report = _report(verified, target)
    emit(as_json, report, f"ok: {report['name']} v{report['version']} signed by {verified.signer[:16]}… "
                          f"({report['files']} files, {report['bytes']} bytes re-hashed)")


commands = [sign_command, verify_command]
