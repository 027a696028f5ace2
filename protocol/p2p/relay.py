"""Circuit relay v2 (`/libp2p/circuit/relay/0.2.0/hop` and `/stop`): a seeder behind a NAT serves its blocks
through a public peer that relays for it.

    relay (public)    $ python -m protocol.p2p serve --relay --listen /ip4/0.0.0.0/tcp/4051
    seeder (NATed)    $ python -m protocol.p2p serve --add model/ --reserve /ip4/RELAY/tcp/4051/p2p/RELAYID
                      {"circuit_addrs": ["/ip4/RELAY/tcp/4051/p2p/RELAYID/p2p-circuit/p2p/SEEDERID"], ...}
    anyone            $ python -m protocol.p2p pull Qm... --peer /ip4/RELAY/.../p2p-circuit/p2p/SEEDERID

The seeder dials out to the relay (which a NAT allows), holds a reservation there and keeps that connection
open; a puller asks the relay to CONNECT it to the seeder, and the relay pipes the two streams together.
Noise and yamux run end to end over that pipe, so bitswap sees one ordinary connection and the relay
sees only ciphertext. A circuit address is dialled by `protocol.p2p.host.connect` like any other.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from protocol.errors import CommonsError
from protocol.p2p import host as hostlib

log = logging.getLogger("commons.relay")

CIRCUIT = "/p2p-circuit"
# What one relay grants: py-libp2p's defaults allow only 4 reservations, too few for a campaign's volunteers.
LIMITS = RelayLimits(
    duration=3600,  # s a circuit may stay open; a pull reconnects after that
    data=1 << 30,  # bytes per circuit: a few adapters' worth, not a free CDN
    max_circuit_conns=16,  # concurrent circuits to one reserved peer
    max_reservations=256,
    reservation_ttl=3600,
)
RENEW_S = 600.0  # re-reserve well inside the TTL, so a relay restart is noticed within minutes
CHECK_S = 5.0  # how often the seeder checks that it is still connected to each relay


def circuit_addr(relay_addr: str, peer_id: str) -> str:
    """The address pullers dial to reach `peer_id` through the relay at `relay_addr` (with /p2p/RELAYID)."""
    return f"{relay_addr}{CIRCUIT}/p2p/{peer_id}"


@dataclass
class Circuits:
    """The relay side of one host: whether it relays for others, and its reservations at relays."""

    hop: bool
    addrs: list[str] = field(default_factory=list)  # circuit addresses currently reserved
    errors: dict[str, str] = field(default_factory=dict)  # relay address -> why its reservation failed


@asynccontextmanager
async def open_circuits(host: IHost, hop: bool = False, relays: Sequence[str] = (),
                        hole_punch: bool = False) -> AsyncIterator[Circuits]:
    """Relays for others with `hop`; with `relays`, accepts relayed connections and holds a reservation at
    each (renewed, re-dialled when the connection drops). A relay that cannot be reached is no error at
    start: it lands in `errors` and is retried every CHECK_S. `hole_punch` runs DCUtR, which tries to
    replace each relayed connection by a direct one (docs/p2p.md says when that works)."""
    proto = CircuitV2Protocol(host, limits=LIMITS, allow_hop=hop)  # also answers /stop: relayed dials in
    circuits = Circuits(hop)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(background_trio_service(proto))
        if hole_punch:
            await stack.enter_async_context(background_trio_service(DCUtRProtocol(host)))
        nursery = await stack.enter_async_context(trio.open_nursery())
        for relay in relays:
            await _try_reserve(host, relay, circuits)
            nursery.start_soon(_keep_reserved, host, relay, circuits)
        try:
            yield circuits
        finally:
            nursery.cancel_scope.cancel()


async def reserve(host: IHost, relay: str, timeout: float = hostlib.CONNECT_TIMEOUT) -> str:
    """Dials the relay and reserves a slot there; the circuit address that now reaches this host."""
    info = await hostlib.connect(host, relay, timeout)
    # CLIENT: _make_reservation is the only part of the transport a reserving peer needs
    transport = CircuitV2Transport(host, CircuitV2Protocol(host), RelayConfig(roles=RelayRole.CLIENT))
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(info.peer_id, [HOP_PROTOCOL_ID])
            try:
                granted = await transport._make_reservation(stream, info.peer_id)
            finally:
                await stream.close()
    except trio.TooSlowError:
        granted = False
    except Exception as exc:  # noqa: BLE001 - a peer without the hop protocol fails in multistream
        raise CommonsError(f"peer {relay} does not relay ({_reason(exc)}): "
                           "start it with `serve --relay`") from None
    if not granted:
        raise CommonsError(f"relay {relay} refused a reservation: it may be full; try another relay")
    return circuit_addr(relay, host.get_id().to_base58())


async def dial(host: IHost, addr: str, timeout: float = hostlib.CONNECT_TIMEOUT) -> PeerInfo:
    """Connects to the peer at the end of a circuit address through its relay (no reservation of ours)."""
    info = hostlib.peer_info(addr)
    if host.get_network().get_connections(info.peer_id):
        return info  # already connected, relayed or direct: streams reuse it
    # STOP only: a dialler must not take one of the relay's reservation slots just to pull
    transport = CircuitV2Transport(host, CircuitV2Protocol(host), RelayConfig(roles=RelayRole.STOP))
    try:
        with trio.fail_after(timeout):
            await transport.dial(multiaddr.Multiaddr(addr))
    except trio.TooSlowError:
        raise CommonsError(f"peer {addr} did not answer through its relay in {timeout:.0f}s: "
                           "check the relay runs and the peer still holds a reservation there") from None
    except Exception as exc:  # noqa: BLE001 - relay errors come from every layer (tcp, hop, noise, yamux)
        raise CommonsError(f"cannot reach peer {addr} through its relay ({_reason(exc)}): check the relay "
                           "runs and the peer was started with `serve --reserve RELAY`") from None
    return info


async def _try_reserve(host: IHost, relay: str, circuits: Circuits) -> bool:
    try:
        addr = await reserve(host, relay)
    except CommonsError as exc:
        circuits.errors[relay] = str(exc)
        stale = circuit_addr(relay, host.get_id().to_base58())
        if stale in circuits.addrs:  # pullers would dial a dead circuit
            circuits.addrs.remove(stale)
        log.warning("relay reservation failed relay=%s error=%s", relay, exc)
        return False
    circuits.errors.pop(relay, None)
    if addr not in circuits.addrs:
        circuits.addrs.append(addr)
        log.info("relay reserved relay=%s circuit=%s", relay, addr)
    return True


async def _keep_reserved(host: IHost, relay: str, circuits: Circuits) -> None:
    """The relay can reach us only over the connection we opened: re-dial and re-reserve when it drops
    (relay restart, NAT mapping timed out), and renew before the reservation lapses."""
    relay_id = hostlib.peer_info(relay).peer_id
    last = trio.current_time() if relay not in circuits.errors else float("-inf")
    while True:
        await trio.sleep(CHECK_S)
        connected = bool(host.get_network().get_connections(relay_id))
        if not connected:  # py-libp2p refuses to re-dial a peer that failed within the last minute
            host.get_network().unblock_peer(relay_id)
        due = not connected or trio.current_time() - last > RENEW_S
        if due and await _try_reserve(host, relay, circuits):
            last = trio.current_time()


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
