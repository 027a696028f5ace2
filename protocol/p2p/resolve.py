"""`/commons/resolve/1.0.0`: ask peers which CID a name (or name@version) stands for, without an index.

    request  = frame(canonical JSON {"name": "math-lora", "version": 3 | null})
    response = frame(canonical JSON {"cid": "Qm...", "envelope": "<model.sig text>"}) | frame(b"")

An index answers from its database; any other peer from the adapter announcements it has verified
(`Gossip.lookup`). Nothing in an answer is trusted: the caller checks that the envelope's signature
verifies under its trust policy and that it signs the name and version asked for, and `commons pull`
then verifies the fetched directory against its own model.sig. Peers are asked in turn; the highest
version among valid answers wins when no version was given.

    >>> found = resolve_name(["/ip4/10.0.0.5/tcp/4051/p2p/12D3KooW..."], "math-lora", None)
    >>> found.cid, found.verified.meta.version, found.peer
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from protocol.content.multiformats import CID
from protocol.errors import CommonsError, VerifyError
from protocol.p2p import host as hostlib
from protocol.p2p.announce import canonical
from protocol.p2p.wire import STREAM_ERRORS, FrameError, FrameReader, frame
from protocol.signing.manifest import Verified, verify_envelope

RESOLVE_PROTOCOL = TProtocol("/commons/resolve/1.0.0")
ASK_TIMEOUT_S = 10.0

# name, version (None: latest) -> (cid, envelope text) or None
Lookup = Callable[[str, int | None], "tuple[str, str] | None"]


@dataclass
class Resolved:
    cid: str
    envelope: bytes
    verified: Verified
    peer: str


def resolve_handler(lookup: Lookup):
    """A stream handler answering one request per stream from `lookup` (sync, may be slow: a thread)."""

    async def handle(stream: INetStream) -> None:
        try:
            request = json.loads(await FrameReader(stream).read())
            name, version = request["name"], request.get("version")
            if not isinstance(name, str) or not (version is None or isinstance(version, int)):
                return
            found = await trio.to_thread.run_sync(lookup, name, version)
            answer = canonical({"cid": found[0], "envelope": found[1]}) if found else b""
            await stream.write(frame(answer))
        except (*STREAM_ERRORS, FrameError, ValueError, KeyError, TypeError, AttributeError):
            pass
        finally:
            with trio.move_on_after(1):
                await stream.close()

    return handle


def serve_resolve(host: IHost, lookup: Lookup) -> None:
    host.set_stream_handler(RESOLVE_PROTOCOL, resolve_handler(lookup))


def check_answer(answer: bytes, name: str, version: int | None, policy=None) -> tuple[str, bytes, Verified]:
    """(cid, envelope, verified) when the answer is well formed, validly signed and signs what was asked."""
    try:
        data = json.loads(answer)
        cid, envelope = str(CID.decode(data["cid"])), data["envelope"].encode("utf-8")
    except Exception:  # noqa: BLE001 - any malformed answer means the same: ignore this peer
        raise VerifyError("malformed resolve answer") from None
    verified = verify_envelope(envelope, policy)
    meta = verified.meta
    if meta.name != name or (version is not None and int(meta.version) != version):
        raise VerifyError(f"asked for {name}@{version}, the answer signs {meta.name}@{meta.version}")
    return cid, envelope, verified


async def ask(host: IHost, addr: str, name: str, version: int | None) -> bytes:
    info = await hostlib.connect(host, addr)
    with trio.fail_after(ASK_TIMEOUT_S):
        stream = await host.new_stream(info.peer_id, [RESOLVE_PROTOCOL])
        try:
            await stream.write(frame(canonical({"name": name, "version": version})))
            return await FrameReader(stream).read()
        finally:
            with trio.move_on_after(1):
                await stream.close()


async def resolve_async(host: IHost, peers: Sequence[str], name: str, version: int | None,
                        policy=None) -> Resolved:
    best: Resolved | None = None
    why: list[str] = []
    for addr in peers:
        try:
            answer = await ask(host, addr, name, version)
        except (CommonsError, trio.TooSlowError, *STREAM_ERRORS, FrameError) as exc:
            why.append(f"{addr}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        if not answer:
            why.append(f"{addr}: does not know {name}")
            continue
        try:
            cid, envelope, verified = check_answer(answer, name, version, policy)
        except VerifyError as exc:
            why.append(f"{addr}: {exc}")
            continue
        if best is None or int(verified.meta.version) > int(best.verified.meta.version):
            best = Resolved(cid, envelope, verified, addr)
    if best is None:
        wanted = f"{name}@{version}" if version is not None else name
        reasons = "; ".join(why) or "no peers"
        raise CommonsError(f"no peer could resolve {wanted} ({reasons}); check the name or "
                           "pass an index with --index URL")
    return best


def resolve_name(peers: Sequence[str], name: str, version: int | None, policy=None) -> Resolved:
    """Blocking: ask every peer (a throwaway host), return the best verified answer."""
    from protocol.p2p.exchange import run_client

    return run_client(None, lambda host: resolve_async(host, peers, name, version, policy))
