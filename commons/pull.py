"""Resolve an adapter by name or CID, fetch and verify it, and lay out a PEFT folder.

    >>> pulled = pull("dates-iso@1", out=Path("adapters/dates"))      # resolve, fetch, verify, lay out

The output folder is only ever replaced when it is empty or holds an earlier pull of the same name and
nothing else; anything else there is refused before a byte is fetched, so pull never deletes what it did
not create. What lands there is exactly what the signature covers (see `protocol.content.fetch.fetch_signed`),
written beside the folder first and swapped in once every file verified.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from commons import config
from protocol.content.blockstore import BlockStore
from protocol.content.fetch import NODE_OVERHEAD, BlockSource, Prefetch, fetch_signed, write_signed
from protocol.content.gateway import GatewaySource
from protocol.content.multiformats import CID
from protocol.content.unixfs import Bounds
from protocol.errors import CommonsError, VerifyError
from protocol.home import sub
from protocol.signing.manifest import SIGNATURE_FILE, Verified, verify_directory
from protocol.signing.trust import TrustPolicy

_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,99})(@(?P<version>\d{1,15}))?$")


@dataclass
class Pulled:
    cid: str
    path: Path
    verified: Verified

    def python(self) -> str:
        """The snippet that loads it; the signed base_model is the publisher's text, so it is quoted,
        not pasted."""
        base, path = json.dumps(self.verified.meta.base_model), json.dumps(str(self.path))
        return f"from commons import load_adapter\nmodel = load_adapter({base}, {path})"


def is_cid(ref: str) -> bool:
    try:
        CID.decode(ref)
    except Exception:  # noqa: BLE001 - anything that does not decode is a name
        return False
    return ref.startswith(("Qm", "b"))


def resolve(ref: str, index_url: str, peers: list[str] | None = None) -> str:
    """name, name@version or CID -> root CID (names go through the index's JSON API, else libp2p `peers`)."""
    if is_cid(ref):
        return str(CID.decode(ref))
    match = _REF.match(ref)
    if not match:
        raise CommonsError(f"{ref!r} is neither a CID nor NAME[@VERSION]; e.g. `commons pull dates-iso@1`")
    try:
        reply = httpx.get(f"{index_url.rstrip('/')}/api/resolve/{ref}", timeout=15)
    except httpx.HTTPError:
        if peers:  # no index: ask the peers, which answer from the announcements they verified
            from protocol.p2p.resolve import resolve_name

            version = match.group("version")
            return resolve_name(peers, match.group("name"), int(version) if version else None).cid
        raise CommonsError(
            f"cannot reach the index at {index_url}: start it with `commons index serve` or pass --index URL"
        ) from None
    if reply.status_code != 200:
        try:
            detail = reply.json().get("detail", reply.text)
        except ValueError:
            detail = reply.text
        raise CommonsError(f"the index could not resolve {ref!r}: {str(detail)[:200]}")
    try:
        return str(CID.decode(str(reply.json()["cid"])))
    except (ValueError, KeyError, TypeError, CommonsError):
        raise CommonsError(f"the index at {index_url} answered {ref!r} with no CID; check --index") from None


def pull(ref: str, out: Path | None = None, index_url: str | None = None, progress: bool = True,
         allow_older: bool = False) -> Pulled:
    """Resolve, fetch within what the manifest promises, verify, lay out;
    `allow_older` takes an older version."""
    settings = config.load()
    index_url = index_url or settings["index_url"]
    cid = resolve(ref, index_url, settings["peers"])
    target = Path(out).absolute() if out else sub("adapters") / cid
    earlier = earlier_pull(target)  # refuses a folder pull did not make, before anything is fetched
    policy = TrustPolicy.load()
    policy.allow_older = allow_older
    # fetch and check, bounded by the signed manifest: each file from the bitswap peers (commons nodes, Kubo,
    # Helia) first, 32 blocks in flight; single blocks and whatever the peers lacked from the gateways
    store = BlockStore()
    gateways = [GatewaySource(url) for url in [index_url, *settings["gateways"]]]
    sources: list[BlockSource] = list(gateways)
    prefetch = swap = None
    if settings["peers"]:
        from protocol.p2p.bitswap import BitswapSource

        swap = BitswapSource(settings["peers"])
        sources.append(swap)
        prefetch = _from_peers(swap, store, progress)
    try:
        signed = fetch_signed(cid, store, sources, policy, progress=progress, prefetch=prefetch)
    except VerifyError as exc:
        raise VerifyError(f"refusing {ref}: {str(exc).removesuffix('; refusing it')}") from None
    finally:
        for source in (*gateways, *([swap] if swap else [])):
            source.close()
    _check_names(ref, signed.verified)
    if earlier not in (None, signed.verified.meta.name):
        raise CommonsError(f"{target} holds an earlier pull of {earlier}, not {signed.verified.meta.name}; "
                           "pass --out with a new or empty folder (nothing was deleted)")
    # lay out beside the target, verify again from disk, swap in
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=target.parent))
    try:
        write_signed(store.get, signed, staging / "adapter")
        try:
            verified = verify_directory(staging / "adapter", policy, progress=progress)
        except VerifyError as exc:
            raise VerifyError(f"refusing {ref}: {exc}") from None
        _swap_in(staging / "adapter", target, staging, signed.verified.meta.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Pulled(cid=cid, path=target, verified=verified)


def earlier_pull(target: Path) -> str | None:
    """None when `target` is free (absent or empty), else the name an earlier pull left there.

    Anything else is a CommonsError: a file, a symlink, or a folder holding a single entry more than the
    signed files of an earlier pull (a .git, notes, an edited weight) is never replaced.
    """
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CommonsError(f"{target} is not a folder; pass --out with a new or empty folder (nothing was "
                           "deleted)")
    if not target.exists() or not any(target.iterdir()):
        return None
    refused = CommonsError(f"{target} is not empty and is not an earlier pull; pass --out with a new or "
                           "empty folder (nothing was deleted)")
    try:
        verified = verify_directory(target, TrustPolicy(), record=False)
    except CommonsError:
        raise refused from None
    signed = {SIGNATURE_FILE, *(f["name"] for f in verified.files)}
    folders = {name.rsplit("/", i)[0] for name in signed for i in range(1, name.count("/") + 1)}
    for path in target.rglob("*"):
        rel = path.relative_to(target).as_posix()
        if rel not in (signed if path.is_file() and not path.is_symlink() else folders):
            raise refused
    return verified.meta.name


def _swap_in(new: Path, target: Path, staging: Path, name: str) -> None:
    """Put `new` at `target`: over an empty folder directly, over an earlier pull of `name` by two renames.

    The target is looked at again first: the fetch may have taken minutes, and whatever was written there
    meanwhile is not pull's to delete.
    """
    try:
        still = earlier_pull(target)
    except CommonsError:
        still = ""
    if still not in (None, name):
        raise CommonsError(f"{target} changed while pulling and is no longer an earlier pull of {name}; pass "
                           "--out with a new or empty folder (nothing was deleted)")
    try:
        if not target.exists() or not any(target.iterdir()):
            os.replace(new, target)
            return
        old = staging / "earlier"
        os.replace(target, old)
        try:
            os.replace(new, target)
        except OSError:
            os.replace(old, target)
            raise
    except OSError as exc:
        raise CommonsError(f"cannot put the pull at {target} ({exc.strerror}); pass --out with a new or "
                           "empty folder (nothing was deleted)") from None


def _check_names(ref: str, verified: Verified) -> None:
    """Whoever resolved NAME (index or peer), the signed manifest must be NAME's, at the version asked."""
    match = None if is_cid(ref) else _REF.match(ref)
    if match is None:
        return
    meta = verified.meta
    version = match.group("version")
    if meta.name != match.group("name") or (version is not None and int(meta.version) != int(version)):
        raise VerifyError(f"refusing {ref}: what it resolved to is signed as {meta.name}@{meta.version}; the "
                          "index or peer that answered is wrong or lying, try another")


class _OverBudget(CommonsError):
    """Raised inside the libp2p fetch so it stops at once (a plain CommonsError ends it,
    a VerifyError would not)."""


def _from_peers(swap, store: BlockStore, progress: bool) -> Prefetch:
    """The fast path for one signed file (a protocol.p2p.bitswap.BitswapSource: 32 blocks in flight),
    stopped past its bounds; whatever it could not get, the gateways are asked for next."""

    def prefetch(cid: str, bounds: Bounds) -> None:
        taken = {"blocks": 0, "bytes": 0}

        def count(_cid: str, size: int) -> None:
            taken["blocks"] += 1
            taken["bytes"] += size
            if taken["blocks"] > bounds.links or taken["bytes"] > bounds.bytes + bounds.links * NODE_OVERHEAD:
                raise _OverBudget(f"{cid} takes more than the {bounds.links} blocks and {bounds.bytes} bytes "
                                  "promised for it (a DAG bomb)")

        try:
            swap.fetch_dag(cid, store, progress, on_block=count)
        except _OverBudget as exc:
            raise VerifyError(str(exc)) from None
        except CommonsError:
            pass

    return prefetch
