"""Peer-to-peer for LoRA Commons on py-libp2p (trio): bitswap, the IPFS DHT, signed gossipsub
announcements. Every block moves over bitswap, so Kubo and Helia are peers like any commons node.

Example (seed on one machine, pull on another):

    $ python -m protocol.p2p serve --add adapter_dir --listen /ip4/0.0.0.0/tcp/4051
    {"peer_id": "12D3KooW...", "addrs": ["/ip4/10.0.0.1/tcp/4051/p2p/12D3KooW..."], "root": "Qm..."}
    $ python -m protocol.p2p pull Qm... --peer /ip4/10.0.0.1/tcp/4051/p2p/12D3KooW... --out adapter_dir

Modules: `host` (identity → libp2p host), `wire` (length-prefixed frames, the serving pacer),
`bitswap` and `bitswap_message` (`/ipfs/bitswap/1.2.0`: serve a BlockStore; fetch a DAG pipelined
with fail-over; `BitswapSource` for `protocol.content.fetch`), `exchange` (what a DAG fetch shares: the
walk, its report, a short-lived client host), `routed` (a bitswap source whose peers a delegated router
names), `dht` (kad-dht `/ipfs/kad/1.0.0`: provide and find providers), `node` (`open_node`: one host
with all of these), `announce` (signed announcement dataclasses and their checks), `topics` (gossipsub
wiring), `resolve` (`/commons/resolve/1.0.0`: NAME → CID from a peer, checked against the signed
envelope), `announcer` (publisher side: announce, seed until a peer re-announces), `relay` (circuit relay
v2: relay for peers behind NATs, reserve a slot at a relay, dial a `/p2p-circuit` address), `service` (the
long-running shells: seed a store forever, pull a DAG and export it), `background` (a trio peer on its
own thread, for uvicorn and the node daemon). The index's ingestion lives in `index/gossip.py`.
"""
