"""The publisher's side of an announcement: seed the DAG, announce it, stay until someone else holds it.

    >>> report = trio.run(announce_and_seed, store, identity,
    ...                   lambda addrs: AdapterAnnouncement(cid, "math-lora", 3, envelope, addrs),
    ...                   ["/ip4/0.0.0.0/tcp/0"], ["/ip4/10.0.0.5/tcp/4051/p2p/12D3KooW..."], 120.0)
    >>> report.confirmed_by        # peer ids that re-announced the CID after fetching it (an index)

When to stop seeding: after `seed_seconds`, or as soon as another peer announces the same CID (an
index re-announces what it fetched, so from then on it is a provider and this laptop may go away).
The announcement is re-sent every `REANNOUNCE_S` with a fresh nonce, so a peer that joins late (or
missed the first message while its mesh formed) still hears it; receivers skip a CID they already hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from protocol.errors import CommonsError
from protocol.p2p.announce import AdapterAnnouncement, Announcement, DatasetAnnouncement
from protocol.p2p.node import Node, open_node

REANNOUNCE_S = 20.0
SUBSCRIBER_WAIT_S = 10.0


@dataclass
class SeedReport:
    cid: str
    peer_id: str
    addrs: list[str]
    announced: int = 0
    confirmed_by: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bootstrap_errors: dict[str, str] = field(default_factory=dict)


async def wait_for_subscribers(node: Node, topic: str, timeout: float = SUBSCRIBER_WAIT_S) -> bool:
    """True once a connected peer subscribed to `topic` (gossipsub drops messages nobody listens to)."""
    with trio.move_on_after(timeout):
        while not node.gossip.pubsub.peer_topics.get(topic):
            await trio.sleep(0.1)
        return True
    return False


async def announce_and_seed(
    store,
    identity,
    make_body: Callable[[list[str]], Announcement],
    listen: Sequence[str],
    bootstrap: Sequence[str],
    seed_seconds: float,
    on_ready: Callable[[Node], None] | None = None,
) -> SeedReport:
    """Seeds `store`, announces `make_body(our dialable addrs)`, returns when confirmed or time is up."""
    start = trio.current_time()
    async with open_node(store, identity, listen, bootstrap, gossip=True) as node:
        body = make_body(node.dialable_addrs)
        if not isinstance(body, (AdapterAnnouncement, DatasetAnnouncement)):
            raise CommonsError("announce_and_seed announces adapters or datasets; "
                               "presence is sent by `serve`")
        report = SeedReport(body.cid, node.peer_id, node.dialable_addrs,
                            bootstrap_errors=node.bootstrap_errors)
        if not node.host.get_connected_peers():
            reasons = "; ".join(node.bootstrap_errors.values()) or "no --bootstrap peer given"
            raise CommonsError(f"no peer reachable to announce {body.cid} to ({reasons}); pass --bootstrap "
                               "/ip4/.../p2p/12D3KooW... of an index or seeder (or set peers in config.toml)")
        if on_ready is not None:
            on_ready(node)
        with trio.move_on_after(seed_seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_confirmations, node, body, identity.public_hex, report,
                                   nursery.cancel_scope)
                await wait_for_subscribers(node, body.topic)
                while True:
                    await node.gossip.publish(body)
                    report.announced += 1
                    await trio.sleep(REANNOUNCE_S)
        report.seconds = round(trio.current_time() - start, 2)
        return report


async def _watch_confirmations(node: Node, body: Announcement, own_key: str, report: SeedReport,
                               done: trio.CancelScope) -> None:
    async for signed in node.gossip.messages(body.topic):
        if signed.signer != own_key and getattr(signed.body, "cid", None) == body.cid:
            report.confirmed_by.append(signed.peer_id)
            done.cancel()
            return


def announce_adapter(cid: str, envelope: bytes, name: str, version: int, store, identity,
                     listen: Sequence[str], bootstrap: Sequence[str], seed_seconds: float,
                     on_ready: Callable[[Node], None] | None = None) -> SeedReport:
    """Blocking: announce a published adapter version on gossip and seed it (see `announce_and_seed`)."""
    text = bytes(envelope).decode("utf-8")

    def body(addrs: list[str]) -> AdapterAnnouncement:
        return AdapterAnnouncement(cid, name, int(version), text, addrs)

    try:
        return trio.run(announce_and_seed, store, identity, body, list(listen), list(bootstrap), seed_seconds,
                        on_ready)
    except BaseExceptionGroup as group:
        from protocol.p2p.exchange import unwrap

        raise unwrap(group) from None
