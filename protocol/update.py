"""The signed digest of a training update: what a volunteer vouches for when it sends its shard back."""

from __future__ import annotations

import hashlib

import numpy as np

DOMAIN = b"commons-update/v1\n"


def update_digest(campaign: str, round_: int, tensors: dict[str, np.ndarray]) -> bytes:
    """sha256 over campaign, round and every tensor (name, dtype, shape, bytes) in key order."""
    h = hashlib.sha256(DOMAIN)
    h.update(f"{campaign}\n{round_}\n".encode())
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        h.update(f"{key}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(memoryview(array).cast("B"))
    return h.digest()
