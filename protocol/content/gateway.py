"""A block source over HTTP: any IPFS trustless gateway (`GET /ipfs/{cid}?format=raw`), the index included.

Nothing it returns is trusted: `fetch_dag` re-hashes every block against the CID it asked for, and no
reply is read past MAX_BLOCK bytes, so a gateway that streams forever costs one block's worth of memory.
"""

from __future__ import annotations

import time

import httpx

from protocol.content.fetch import MAX_BLOCK

RAW = "application/vnd.ipld.raw"


class GatewaySource:
    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = self.base_url
        self.timeout = timeout
        self._client = httpx.Client(timeout=timeout, headers={"Accept": RAW}, follow_redirects=True)

    def get_block(self, cid: str) -> bytes | None:
        """The block, or None when this gateway does not hold it, cannot be reached or sends too much."""
        deadline = time.monotonic() + self.timeout  # a gateway that trickles bytes forever is one that failed
        try:
            with self._client.stream("GET", f"{self.base_url}/ipfs/{cid}", params={"format": "raw"}) as reply:
                if reply.status_code != 200:
                    return None
                block = bytearray()
                for piece in reply.iter_bytes():
                    block += piece
                    if len(block) > MAX_BLOCK or time.monotonic() > deadline:
                        return None
                return bytes(block)
        except httpx.HTTPError:
            return None

    def close(self) -> None:
        self._client.close()
