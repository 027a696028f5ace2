"""Gossipsub wiring for the announcement topics, and the provider table the announcements build.

    >>> async with open_gossip(host, identity) as gossip:
    ...     await gossip.publish(AdapterAnnouncement(cid, "math-lora", 3, envelope, providers=addrs))
    ...     async for signed in gossip.messages(TOPIC_ADAPTERS):   # only verified, fresh, first-seen
    ...         print(signed.body.name, gossip.providers(signed.body.cid))

Invalid messages are refused by a topic validator, so this node does not forward them either; the
replay check runs once more on delivery, where the per-node "seen" set lives.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from protocol.errors import CommonsError, VerifyError
from protocol.p2p.announce import (
    TOPIC_ADAPTERS,
    TOPIC_DATASETS,
    TOPIC_PRESENCE,
    WINDOW_S,
    AdapterAnnouncement,
    Announcement,
    Checker,
    DatasetAnnouncement,
    Signed,
    decode,
    sign,
)

TOPICS = (TOPIC_ADAPTERS, TOPIC_DATASETS, TOPIC_PRESENCE)
MAX_NAMES = 10_000  # adapter names remembered from announcements (bounded: anyone can announce)


def make_pubsub(host: IHost) -> tuple[Pubsub, GossipSub]:
    """Build before dialing anyone: Pubsub learns about peers from connection events."""
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
    )
    return Pubsub(host, router, strict_signing=True), router


class Gossip:
    def __init__(self, pubsub: Pubsub, identity=None, window_s: int = WINDOW_S) -> None:
        self.pubsub = pubsub
        self.identity = identity
        self.checker = Checker(window_s)
        self.dropped: Counter[str] = Counter()
        self._providers: dict[str, set[str]] = {}
        # name -> version -> (cid, envelope, signer)
        self._adapters: dict[str, dict[int, tuple[str, str, str]]] = {}
        for topic in TOPICS:
            pubsub.set_topic_validator(topic, self._validator(topic), is_async_validator=False)

    def _validator(self, topic: str):
        def validate(_forwarder: ID, msg: rpc_pb2.Message) -> bool:
            try:
                signed = decode(msg.data, topic)
            except VerifyError:
                self.dropped["invalid"] += 1
                return False
            if abs(time.time() - signed.timestamp) > self.checker.window_s:
                self.dropped["stale"] += 1
                return False
            return True

        return validate

    async def publish(self, body: Announcement) -> bytes:
        if self.identity is None:
            raise CommonsError("publishing announcements needs an identity: start the node with your key")
        wire = sign(body, self.identity)
        await self.pubsub.publish(body.topic, wire)
        return wire

    async def messages(self, topic: str) -> AsyncIterator[Signed]:
        """Verified, fresh, first-seen announcements on `topic`; the rest are counted in `dropped`."""
        subscription = await self.pubsub.subscribe(topic)
        async for msg in subscription:
            try:
                signed = self.checker.check(msg.data, topic)
            except VerifyError as exc:
                self.dropped["replayed" if "replayed" in str(exc) else "stale" if "stale" in str(exc)
                             else "invalid"] += 1
                continue
            self.remember(signed)
            yield signed

    def remember(self, signed: Signed) -> None:
        body = signed.body
        if isinstance(body, (AdapterAnnouncement, DatasetAnnouncement)):
            self._providers.setdefault(body.cid, set()).update(body.providers)
        if isinstance(body, AdapterAnnouncement):
            self._remember_adapter(body)

    def _remember_adapter(self, body: AdapterAnnouncement) -> None:
        """Keep name → version → CID for `lookup`, only for envelopes that verify and sign that very name
        and version, first signer of a name wins (as in the index): a liar cannot shadow a real name here."""
        from protocol.signing.manifest import verify_envelope
        from protocol.signing.trust import TrustPolicy

        if len(self._adapters) >= MAX_NAMES and body.name not in self._adapters:
            return
        try:
            verified = verify_envelope(body.envelope.encode("utf-8"), TrustPolicy())
        except CommonsError:
            return
        if verified.meta.name != body.name or int(verified.meta.version) != body.version:
            return
        versions = self._adapters.setdefault(body.name, {})
        if any(signer != verified.signer for _, _, signer in versions.values()):
            return
        versions.setdefault(body.version, (body.cid, body.envelope, verified.signer))

    def lookup(self, name: str, version: int | None = None) -> tuple[str, str] | None:
        """(cid, envelope) of `name` (latest, or `version`) from verified announcements; None if unknown."""
        versions = self._adapters.get(name) or {}
        key = version if version is not None else max(versions, default=None)
        found = versions.get(key) if key is not None else None
        return (found[0], found[1]) if found else None

    def providers(self, cid: str) -> list[str]:
        """Multiaddrs of peers that announced they hold `cid` (provider lookup by announcement)."""
        return sorted(self._providers.get(cid, ()))


@asynccontextmanager
async def open_gossip(pubsub: Pubsub, router: GossipSub, identity=None,
                      window_s: int = WINDOW_S) -> AsyncIterator[Gossip]:
    async with background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        yield Gossip(pubsub, identity, window_s)
