"""A libp2p host whose identity is the node's ed25519 key, so its peer id equals `Identity.peer_id()`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from protocol.errors import CommonsError

DEFAULT_PORT = 4051
LOCAL_LISTEN = "/ip4/127.0.0.1/tcp/0"
CONNECT_TIMEOUT = 15.0

# py-libp2p logs every dropped connection at WARNING/ERROR; a peer going away is normal for us.
for _name in ("libp2p", "multiaddr"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


def identity_seed(identity: Any) -> bytes:
    """The 32-byte ed25519 seed of a `protocol.signing.keys.Identity` (or of a raw seed)."""
    if isinstance(identity, (bytes, bytearray)):
        seed = bytes(identity)
    else:
        seed = getattr(identity, "secret_seed", None)
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
        raise CommonsError("identity has no 32-byte ed25519 seed: pass a protocol.signing.keys.Identity")
    return bytes(seed)


def keypair_from_seed(seed: bytes) -> KeyPair:
    """The libp2p key pair for an ed25519 seed (the same key `Identity` signs with)."""
    return create_new_key_pair(seed)


def make_host(seed: bytes | None = None, mdns: bool = False) -> IHost:
    """TCP + noise + yamux host; a throwaway key when no seed is given (pull-only clients)."""
    return new_host(key_pair=keypair_from_seed(seed) if seed else create_new_key_pair(), enable_mDNS=mdns)


def listen_addrs(addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
    try:
        return [multiaddr.Multiaddr(a) for a in addrs]
    except Exception as exc:  # noqa: BLE001 - multiaddr raises many unrelated types for bad text
        raise CommonsError(f"bad listen address {list(addrs)}: {exc}; "
                           "use e.g. /ip4/0.0.0.0/tcp/4051") from None


def peer_info(addr: str) -> PeerInfo:
    """Parses `/ip4/HOST/tcp/PORT/p2p/PEERID`; one-line error naming the expected form."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception:  # noqa: BLE001 - multiaddr raises many unrelated types for bad text
        raise CommonsError(
            f"bad peer address {addr!r}: expected /ip4/HOST/tcp/PORT/p2p/12D3KooW... "
            "(as `commons p2p serve` prints)"
        ) from None


def host_addrs(host: IHost) -> list[str]:
    return [str(a) for a in host.get_addrs()]


async def connect(host: IHost, addr: str, timeout: float = CONNECT_TIMEOUT) -> PeerInfo:
    """Dials a peer by its full multiaddr; CommonsError (one line) when it cannot be reached."""
    if "/p2p-circuit" in addr:  # through a relay; imported here because protocol.p2p.relay builds on this
        from protocol.p2p import relay

        return await relay.dial(host, addr, timeout)
    info = peer_info(addr)
    try:
        with trio.fail_after(timeout):
            await host.connect(info)
    except trio.TooSlowError:
        raise CommonsError(f"peer {addr} did not answer in {timeout:.0f}s: "
                           "check it runs and the port is open") from None
    except Exception as exc:  # noqa: BLE001 - dial errors come from every layer (tcp, noise, yamux)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CommonsError(f"cannot reach peer {addr} ({reason}): "
                           "check it runs and the port is open") from None
    return info


def local_ips() -> list[str]:
    """IPv4 addresses of this machine's interfaces that peers could dial (loopback first)."""
    import socket

    found = ["127.0.0.1"]
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.append(str(info[4][0]))
    except OSError:
        pass
    try:  # the address of the default route's interface; connect() on UDP sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            found.append(probe.getsockname()[0])
    except OSError:
        pass
    return list(dict.fromkeys(ip for ip in found if not ip.startswith("127.") or ip == "127.0.0.1"))


def dialable(addrs: Sequence[str]) -> list[str]:
    """Listen addresses as others can dial them: /ip4/0.0.0.0/... becomes one address per interface."""
    out: list[str] = []
    for addr in addrs:
        if addr.startswith("/ip4/0.0.0.0/"):
            out += [addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in local_ips()]
        else:
            out.append(addr)
    return list(dict.fromkeys(out))
