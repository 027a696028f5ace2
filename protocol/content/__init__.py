"""Content addressing exactly as Kubo does it, so our CIDs are IPFS CIDs.

    multiformats.py  varints, base32/base58btc, sha2-256 CIDs (v0 and v1)
    dagpb.py         dag-pb nodes, encoded byte-for-byte as Kubo encodes them
    unixfs.py        files and directories → DAGs (`import_file`, `import_directory`) and back (`export`)
    car.py           CARv1 export/import, every block re-hashed on read
    blockstore.py    blocks on disk, one file per block, atomic writes
    fetch.py         `fetch_dag(cid, store, sources, bounds)`: any mix of block sources, every block
                     verified, every walk bounded; `gateway.py` is one such source over HTTP
    kubo.py          the Kubo RPC API client; `pinning.py` the IPFS Pinning Service API client
    routing.py       a Delegated Routing V1 HTTP API client: the bitswap providers of a CID

A new block source implements `fetch.BlockSource` (`get_block(cid) -> bytes | None`) and is passed to
`fetch_dag`.
"""
