"""A volunteer's node settings: where its state lives, its local data, what it lends (threads, VRAM, idle).

`commons node start` passes them as the SuperNode's node config; node/client_app.py reads them back for
every message. Their own module, below node/worker.py and node/data.py, because both read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol.signing.keys import Identity


@dataclass
class NodeSettings:
    home: Path
    data: Path
    threads: int | None = None
    max_vram_gb: float | None = None
    idle_only: bool = False
    started: float = 0.0  # time.time() when `commons node start` ran (else the runner's start); 0: unknown

    @property
    def identity(self) -> Identity:
        return Identity.load_or_create(self.home / "identity" / "ed25519.key")
