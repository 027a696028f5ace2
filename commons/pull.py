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


def resolve(ref: str, index_url: str) -> str:
    """name, name@version or CID -> root CID (names go through the index's JSON API)."""
    if is_cid(ref):
        return str(CID.decode(ref))
    if not _REF.match(ref):
        raise CommonsError(f"{ref!r} is neither a CID nor NAME[@VERSION]; e.g. `commons pull dates-iso@1`")
    try:
        reply = httpx.get(f"{index_url.rstrip('/')}/api/resolve/{ref}", timeout=15)
    except httpx.HTTPError:
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
    cid = resolve(ref, index_url)
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
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        (staging / "adapter").rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Pulled(cid=cid, path=target, verified=verified)


def _from_peers(cid: str, store: BlockStore, peers: list[str], progress: bool) -> None:
    """The fast pipelined libp2p path; whatever it could not get, the gateways are asked for next."""
    from protocol.p2p.exchange import PeerSource

    try:
        PeerSource(peers).fetch_dag(cid, store, progress=progress)
    except CommonsError:
        pass
