"""A block source over HTTP: any IPFS trustless gateway (`GET /ipfs/{cid}?format=raw`), the index included.

Nothing it returns is trusted: `fetch_dag` re-hashes every block against the CID it asked for.
"""

from __future__ import annotations

import httpx

RAW = "application/vnd.ipld.raw"


class GatewaySource:
    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = self.base_url
        self._client = httpx.Client(timeout=timeout, headers={"Accept": RAW}, follow_redirects=True)

    def get_block(self, cid: str) -> bytes | None:
        """The block, or None when this gateway does not hold it or cannot be reached."""
        try:
            reply = self._client.get(f"{self.base_url}/ipfs/{cid}", params={"format": "raw"})
        except httpx.HTTPError:
            return None
        return reply.content if reply.status_code == 200 else None

    def close(self) -> None:
        self._client.close()
