"""A block source for protocol.content.fetch whose bitswap peers come from a delegated router (the index's
/routing/v1, protocol.content.routing), asked only when a block is first wanted from it.

    >>> sources = [GatewaySource(url), RoutedSource(url, root)]   # what the gateway lacks, from seeders
    >>> fetch_signed(root, store, sources, policy)
    >>> sources[1].close()

Put after the gateways: a pull the gateway serves whole never asks the router nor starts a libp2p host.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from protocol.content.routing import bitswap_providers
from protocol.errors import CommonsError

if TYPE_CHECKING:
    from protocol.p2p.bitswap import BitswapSource


class RoutedSource:
    def __init__(self, router: str, root: str) -> None:
        self.router = router
        self.root = root
        self.name = f"bitswap seeders of {root} listed by {router}"
        self._lock = threading.Lock()
        self._asked = False
        self._swap: BitswapSource | None = None

    def get_block(self, cid: str) -> bytes | None:
        """The block from a listed seeder; None when the router lists none or none has it."""
        swap = self._peers()
        return swap.get_block(cid) if swap is not None else None

    def close(self) -> None:
        if self._swap is not None:
            self._swap.close()

    def _peers(self) -> BitswapSource | None:
        with self._lock:  # protocol.content.fetch asks from several threads at once
            if not self._asked:
                self._asked = True
                peers = bitswap_providers(self.router, self.root)
                # libp2p takes a second to import: only a fetch that needs a seeder pays it
                from protocol.p2p.bitswap import BitswapSource

                try:
                    self._swap = BitswapSource(peers) if peers else None
                except CommonsError:  # a malformed address in the router's answer: no seeders, then
                    self._swap = None
            return self._swap
