"""Resolve an adapter by name or CID, fetch and verify it, and lay out a PEFT folder."""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from commons import config
from protocol.blockstore import BlockStore
from protocol.errors import CommonsError, VerifyError
from protocol.fetch import fetch_dag
from protocol.gateway import GatewaySource
from protocol.home import sub
from protocol.manifest import Verified, verify_directory
from protocol.multiformats import CID

_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,99})(@(?P<version>\d+))?$")


@dataclass
class Pulled:
    cid: str
    path: Path
    verified: Verified

    def python(self) -> str:
        meta = self.verified.meta
        return (f'from commons import load_adapter\nmodel = load_adapter("{meta.base_model}", "{self.path}")')


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
    return reply.json()["cid"]


def pull(ref: str, out: Path | None = None, index_url: str | None = None, progress: bool = True) -> Pulled:
    settings = config.load()
    index_url = index_url or settings["index_url"]
    cid = resolve(ref, index_url, settings["peers"])
    store = BlockStore()
    if settings["peers"] and store.missing(cid):
        _from_peers(cid, store, settings["peers"], progress)
    fetch_dag(cid, store, [GatewaySource(url) for url in [index_url, *settings["gateways"]]], progress=progress)
    target = Path(out) if out else sub("adapters") / cid
    staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=target.parent if target.parent.exists() else None))
    try:
        store.export(cid, staging / "adapter")
        try:
            verified = verify_directory(staging / "adapter", progress=progress)
        except VerifyError as exc:
            raise VerifyError(f"refusing {ref}: {exc}") from None
        _check_names(ref, verified)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        (staging / "adapter").rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Pulled(cid=cid, path=target, verified=verified)


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


def _from_peers(cid: str, store: BlockStore, peers: list[str], progress: bool) -> None:
    """The fast pipelined libp2p path; whatever it could not get, the gateways are asked for next."""
    from protocol.p2p.exchange import PeerSource

    try:
        PeerSource(peers).fetch_dag(cid, store, progress=progress)
    except CommonsError:
        pass
