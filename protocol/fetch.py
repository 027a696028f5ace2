"""Fetch a whole DAG into the local block store from any mix of sources, verifying every block.

Blocks already held are not fetched again, so an interrupted pull resumes where it stopped; a source
that fails or lies (a block that does not hash to its CID) is skipped for the next one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from protocol.blockstore import BlockStore
from protocol.errors import CommonsError, VerifyError
from protocol.unixfs import block_links


class BlockSource(Protocol):
    name: str

    def get_block(self, cid: str) -> bytes | None: ...


def _from_sources(cid: str, sources: Sequence[BlockSource], store: BlockStore) -> bytes:
    lied = []
    for source in sources:
        block = source.get_block(cid)
        if block is None:
            continue
        try:
            store.put(cid, block)  # re-hashes: a wrong block never lands
        except VerifyError:
            lied.append(source.name)
            continue
        return block
    if lied:  # a VerifyError: the caller can tell tampering from absence
        raise VerifyError(f"block {cid} from {', '.join(lied)} does not hash to its CID (tampered or corrupt) and "
                          "was refused; fetch from a source you trust")
    names = ", ".join(s.name for s in sources) or "no sources"
    raise CommonsError(f"block {cid} is not available from {names}: start a peer that holds it and retry")


def fetch_dag(root: str, store: BlockStore, sources: Sequence[BlockSource], progress: bool = True, workers: int = 8) -> int:
    """Make the store hold every block under `root`; returns how many blocks were fetched."""
    from tqdm import tqdm

    bar = tqdm(desc="pull", unit="B", unit_scale=True, disable=not progress or not sys.stderr.isatty(), file=sys.stderr)
    fetched = 0
    frontier = [root]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while frontier:
            held = [c for c in frontier if store.has(c)]
            wanted = [c for c in frontier if not store.has(c)]
            blocks = {c: store.get(c) for c in held}
            for cid, block in zip(wanted, pool.map(lambda c: _from_sources(c, sources, store), wanted)):
                blocks[cid] = block
                fetched += 1
                bar.update(len(block))
            frontier = [child for cid in frontier for child in block_links(cid, blocks[cid])]
    bar.close()
    return fetched
