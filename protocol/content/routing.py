"""A Delegated Routing V1 HTTP API client (specs.ipfs.tech/routing/http-routing-v1): which peers provide
a CID, as the commons index (index/routing.py) or any IPFS router answers it.

    >>> bitswap_providers("http://index.example:8000", "Qm...")
    ['/ip4/10.0.0.9/tcp/4051/p2p/12D3KooW...']            # for protocol.p2p.bitswap.BitswapSource

A router's answer is a hint: whatever is then fetched from those peers is checked against its CID.
"""

from __future__ import annotations

import httpx

MAX_PROVIDERS = 20  # a router may list hundreds: a handful of seeders is plenty for one DAG
MAX_ADDRS = 8
# our hosts dial plain TCP (noise, yamux) only
_NOT_LIBP2P_TCP = ("/http", "/tls", "/ws", "/quic", "/webrtc", "/webtransport", "/p2p-circuit")


def bitswap_providers(url: str, cid: str, timeout: float = 10.0) -> list[str]:
    """Full multiaddrs (/p2p/ID included) of the bitswap providers of `cid` over TCP that the router at
    `url` lists; [] when it lists none, cannot be reached or does not route (not every gateway does)."""
    try:
        reply = httpx.get(f"{url.rstrip('/')}/routing/v1/providers/{cid}", timeout=timeout,
                          headers={"Accept": "application/json"},
                          params={"filter-protocols": "transport-bitswap"})
        records = reply.json().get("Providers") or [] if reply.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return []
    out: list[str] = []
    for record in records[:MAX_PROVIDERS] if isinstance(records, list) else []:
        if not isinstance(record, dict) or "transport-bitswap" not in (record.get("Protocols") or []):
            continue
        peer_id, addrs = record.get("ID"), record.get("Addrs") or []
        if not isinstance(peer_id, str) or not isinstance(addrs, list):
            continue
        out += [f"{addr}/p2p/{peer_id}" for addr in addrs[:MAX_ADDRS]
                if isinstance(addr, str) and "/tcp/" in addr and "/p2p/" not in addr
                and not any(part in addr for part in _NOT_LIBP2P_TCP)]
    return out
