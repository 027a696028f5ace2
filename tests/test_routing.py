"""The index's Delegated Routing V1 HTTP API (index/routing.py), route by route, and a node's fetch that
takes what the gateway lacks from the seeders the routing lists (protocol.p2p.routed); Helia using the
routing for real is in tests/test_routing_helia.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from index.app import create_app
from index.db import IndexDB
from index.routing import Routes, peer_id_text
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID, RAW, b32encode, b58decode, cid_for, varint_encode
from protocol.signing.keys import Identity

INDEX = Identity.generate().peer_id()
SEEDER = Identity.generate().peer_id()
OTHER = Identity.generate().peer_id()


@pytest.fixture
def store(tmp_path: Path) -> BlockStore:
    return BlockStore(tmp_path / "blocks")


def _client(tmp_path: Path, store: BlockStore, routes: Routes | None, peer_id: str | None = INDEX):
    app = create_app(IndexDB(f"sqlite:///{tmp_path / 'index.db'}"), store, routes=routes, peer_id=peer_id)
    return TestClient(app, base_url="http://10.0.0.5:8000")


def _held(store: BlockStore) -> str:
    cid = str(cid_for(RAW, b"adapter weights"))
    store.put(cid, b"adapter weights")
    return cid


def _libp2p_key(peer_id: str) -> str:
    """The CIDv1 form Helia sends for a peer id: libp2p-key (0x72), base32."""
    return "b" + b32encode(varint_encode(1) + varint_encode(0x72) + b58decode(peer_id))


def test_the_index_lists_itself_and_the_live_seeders_it_verified_as_providers(tmp_path, store) -> None:
    cid = _held(store)
    routes = Routes()
    routes.me([f"/ip4/10.0.0.5/tcp/4051/p2p/{INDEX}"])
    routes.provides(cid, [f"/ip4/10.0.0.9/tcp/4051/p2p/{SEEDER}", f"/ip4/10.0.0.9/udp/1/p2p/{SEEDER}"])
    client = _client(tmp_path, store, routes)

    reply = client.get(f"/routing/v1/providers/{cid}")
    v1 = client.get(f"/routing/v1/providers/{CID.decode(cid).to_v1()}")  # either version of the CID

    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    assert reply.json() == {"Providers": [
        {"Schema": "peer", "ID": INDEX, "Addrs": ["/ip4/10.0.0.5/tcp/4051"],
         "Protocols": ["transport-bitswap"]},
        {"Schema": "peer", "ID": INDEX, "Addrs": ["/ip4/10.0.0.5/tcp/8000/http"],
         "Protocols": ["transport-ipfs-gateway-http"]},
        {"Schema": "peer", "ID": SEEDER, "Addrs": ["/ip4/10.0.0.9/tcp/4051", "/ip4/10.0.0.9/udp/1"],
         "Protocols": ["transport-bitswap"]},
    ]}
    assert v1.json() == reply.json()


def test_ndjson_when_asked_404_when_none_400_when_not_a_cid(tmp_path, store) -> None:
    cid = _held(store)
    client = _client(tmp_path, store, Routes())

    lines = client.get(f"/routing/v1/providers/{cid}", headers={"Accept": "application/x-ndjson, "
                                                                          "application/json;q=0.8"})
    nobody = client.get("/routing/v1/providers/bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
    junk = client.get("/routing/v1/providers/not-a-cid")

    assert lines.status_code == 200 and lines.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line)["Protocols"] for line in lines.text.splitlines()] == [
        ["transport-ipfs-gateway-http"]]  # no libp2p host: the gateway is the only way to it
    assert nobody.status_code == 404 and nobody.json() == {"Providers": []}
    assert junk.status_code == 400 and "is not a CID" in junk.json()["detail"]


def test_a_seeder_is_listed_only_while_live(tmp_path, store) -> None:
    cid = _held(store)
    routes = Routes(live_s=300)
    routes.provides(cid, [f"/ip4/10.0.0.9/tcp/4051/p2p/{SEEDER}"], now=1000.0)
    routes.seen([f"/ip4/10.0.0.7/tcp/4051/p2p/{OTHER}", "/ip4/10.0.0.8/tcp/4051"], now=1000.0)  # no /p2p

    assert [r.peer_id for r in routes.providers(CID.decode(cid), now=1299.0)] == [SEEDER]
    assert routes.providers(CID.decode(cid), now=1301.0) == []  # silent for over 5 minutes
    routes.seen([f"/ip4/10.0.0.9/tcp/4051/p2p/{SEEDER}"], now=1500.0)  # its presence again
    assert [r.peer_id for r in routes.providers(CID.decode(cid), now=1600.0)] == [SEEDER]
    assert routes.peer(OTHER, now=1100.0).addrs == ("/ip4/10.0.0.7/tcp/4051",)


def test_peers_by_base58_or_libp2p_key_cid(tmp_path, store) -> None:
    routes = Routes()
    routes.me([f"/ip4/10.0.0.5/tcp/4051/p2p/{INDEX}"])
    routes.seen([f"/ip4/10.0.0.9/tcp/4051/p2p/{SEEDER}"])
    client = _client(tmp_path, store, routes)

    by_text = client.get(f"/routing/v1/peers/{SEEDER}")
    by_cid = client.get(f"/routing/v1/peers/{_libp2p_key(INDEX)}", headers={"Accept": "application/x-ndjson"})
    unknown = client.get(f"/routing/v1/peers/{OTHER}")
    junk = client.get("/routing/v1/peers/bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")

    assert by_text.json() == {"Peers": [{"Schema": "peer", "ID": SEEDER, "Addrs": ["/ip4/10.0.0.9/tcp/4051"],
                                         "Protocols": ["transport-bitswap"]}]}
    assert json.loads(by_cid.text)["ID"] == INDEX
    assert unknown.status_code == 404
    assert junk.status_code == 400 and "not a libp2p-key" in junk.json()["detail"]
    assert peer_id_text(_libp2p_key(SEEDER)) == SEEDER


def test_filters_keep_the_protocols_and_addresses_asked_for(tmp_path, store) -> None:
    cid = _held(store)
    routes = Routes()
    routes.provides(cid, [f"/ip4/10.0.0.9/tcp/4051/p2p/{SEEDER}",
                          f"/ip4/10.0.0.9/udp/4051/quic-v1/p2p/{SEEDER}"])
    client = _client(tmp_path, store, routes)

    bitswap = client.get(f"/routing/v1/providers/{cid}", params={"filter-protocols": "transport-bitswap"})
    no_quic = client.get(f"/routing/v1/providers/{cid}", params={"filter-addrs": "!quic-v1"})
    webrtc = client.get(f"/routing/v1/providers/{cid}", params={"filter-addrs": "webrtc"})

    assert [p["ID"] for p in bitswap.json()["Providers"]] == [SEEDER]
    assert [p["Addrs"] for p in no_quic.json()["Providers"]] == [["/ip4/10.0.0.5/tcp/8000/http"],
                                                                ["/ip4/10.0.0.9/tcp/4051"]]
    assert webrtc.status_code == 404


def test_blocks_the_gateway_lacks_come_from_the_seeders_its_routing_lists(tmp_path) -> None:
    import trio
    from live_index import serve_index

    from protocol.content.fetch import fetch_dag
    from protocol.content.gateway import GatewaySource
    from protocol.p2p.background import Background
    from protocol.p2p.node import open_node
    from protocol.p2p.routed import RoutedSource

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "data.jsonl").write_bytes(b'{"text": "hello"}\n' * 40_000)  # 720 kB: three leaves
    seed = BlockStore(tmp_path / "seed")
    root = seed.add_path(folder)

    async def seeding(ready) -> None:
        async with open_node(seed) as node:
            ready(node.addrs)
            await trio.sleep_forever()

    seeder = Background(seeding)
    addrs = seeder.start()
    routes = Routes()
    routes.provides(root, addrs)
    try:
        with serve_index(tmp_path / "index", routes=routes) as index:  # it holds none of these blocks
            sources = [GatewaySource(index.url), RoutedSource(index.url, root)]
            fetched = fetch_dag(root, BlockStore(tmp_path / "node"), sources, progress=False)
            for cid, block in seed.dag(root):  # now it holds them all: its gateway is enough
                index.store.put(cid, block)
            unused = RoutedSource(index.url, root)
            sources += [GatewaySource(index.url), unused]
            fetch_dag(root, BlockStore(tmp_path / "node2"), sources[2:], progress=False)
            for source in sources:
                source.close()
    finally:
        seeder.stop()

    assert fetched == len(list(seed.dag(root)))
    BlockStore(tmp_path / "node").export(root, tmp_path / "out")
    assert (tmp_path / "out" / "data.jsonl").read_bytes() == (folder / "data.jsonl").read_bytes()
    assert unused._swap is None and not unused._asked  # no router lookup, no libp2p host
