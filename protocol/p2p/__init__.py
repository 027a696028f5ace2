"""Peer-to-peer for LoRA Commons on py-libp2p (trio): block exchange, signed gossipsub announcements.

Example (seed on one machine, pull on another):

    $ python -m protocol.p2p serve --add adapter_dir --listen /ip4/0.0.0.0/tcp/4051
    {"peer_id": "12D3KooW...", "addrs": ["/ip4/10.0.0.1/tcp/4051/p2p/12D3KooW..."], "root": "Qm..."}
    $ python -m protocol.p2p pull Qm... --peer /ip4/10.0.0.1/tcp/4051/p2p/12D3KooW... --out adapter_dir

Modules: `host` (identity → libp2p host), `wire` (length-prefixed frames), `exchange` (the
`/commons/blocks/1.0.0` protocol: serve a BlockStore, pipelined DAG fetch with fail-over),
`bitswap` and `bitswap_message` (`/ipfs/bitswap/1.2.0`: the same store served to Kubo and Helia, and
fetched from them; `BitswapSource` for `protocol.content.fetch`),
`announce` (signed announcement dataclasses and their checks), `topics` (gossipsub wiring),
`resolve` (`/commons/resolve/1.0.0`: NAME → CID from a peer, checked against the signed envelope),
`announcer` (publisher side: announce, seed until a peer re-announces), `service` (the long-running
shells: seed a store forever, pull a DAG and export it), `background` (a trio peer on
its own thread, for uvicorn and the node daemon). The index's ingestion lives in `index/gossip.py`.
"""
