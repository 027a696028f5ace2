"""A training update on the wire: its encoding (fp32 | bf16 | int8) and the digest a volunteer signs.

    >>> wire = encode(trained, sent, "int8")          # node: what goes into the reply's ArrayRecord
    >>> digest = update_digest(campaign, round_, wire) # signed: the signature covers the bytes sent
    >>> tensors = decode(wire, sent, "int8")           # coordinator, after verifying the signature

fp32 sends the trained tensors themselves. bf16 and int8 send the *delta* from the tensors the node was
sent (both sides hold them), which is small and centred on zero, so rounding costs far less than it would
on the weights: bf16 keeps 8 mantissa bits of each delta (round to nearest even, stored as uint16); int8
stores round(delta / scale) with one float32 scale per tensor (max |delta| / 127), under `scale:<key>`.

    >>> tensors = Decoded(wire, sent, "int8")         # coordinator: the same, decoded key by key when read

A coordinator holds every update of a round until it aggregates: `Decoded` keeps them in their wire form
(a quarter of float32's bytes in int8) and makes each float32 tensor only while a rule reads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import numpy as np

from protocol.errors import VerifyError

DOMAIN = b"commons-update/v1\n"
DTYPES = ("fp32", "bf16", "int8")
SCALE = "scale:"


def update_digest(campaign: str, round_: int, tensors: dict[str, np.ndarray]) -> bytes:
    """sha256 over campaign, round and every tensor (name, dtype, shape, bytes) in key order."""
    h = hashlib.sha256(DOMAIN)
    h.update(f"{campaign}\n{round_}\n".encode())
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        h.update(f"{key}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(memoryview(array).cast("B"))
    return h.digest()


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode(tensors: dict[str, np.ndarray], reference: dict[str, np.ndarray],
           dtype: str) -> dict[str, np.ndarray]:
    """The arrays a node sends for `tensors`, trained from `reference` (the tensors it was sent)."""
    if dtype not in DTYPES:
        raise ValueError(f"upload dtype {dtype!r} is unknown: use one of {', '.join(DTYPES)}")
    if dtype == "fp32":
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    wire: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        delta = np.asarray(value, dtype=np.float32) - np.asarray(reference[key], dtype=np.float32)
        if dtype == "bf16":
            wire[key] = to_bf16(delta)
            continue
        peak = float(np.max(np.abs(delta))) if delta.size else 0.0
        scale = np.float32(peak / 127.0 if peak > 0 and np.isfinite(peak) else 1.0)
        wire[key] = np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
        wire[SCALE + key] = np.array([scale], dtype=np.float32)
    return wire


def decode(wire: dict[str, np.ndarray], reference: dict[str, np.ndarray],
           dtype: str) -> dict[str, np.ndarray]:
    """float32 tensors from a reply; VerifyError (one line) when the arrays do not fit the encoding."""
    return dict(Decoded(wire, reference, dtype))


class Decoded(Mapping[str, np.ndarray]):
    """The float32 tensors of a reply, each decoded when it is read (a fresh array every time); only the
    wire arrays and references to the tensors the node was sent are held.

    Raises VerifyError (one line) at construction, before any tensor is read, when the arrays do not fit
    the encoding: an unknown dtype, an array of another dtype than the campaign's, a shape other than the
    tensor sent, a missing or malformed int8 scale, or an int8 scale for a tensor not sent."""

    def __init__(self, wire: dict[str, np.ndarray], reference: Mapping[str, np.ndarray], dtype: str) -> None:
        want = {"fp32": np.float32, "bf16": np.uint16, "int8": np.int8}.get(dtype)
        if want is None:
            raise VerifyError(f"upload dtype {dtype!r} is unknown: "
                              f"set upload_dtype to one of {', '.join(DTYPES)}")
        self.names = tuple(sorted(k for k in wire if not k.startswith(SCALE)))
        for key in self.names:
            _check(wire, reference, key, dtype, want)
        if dtype == "int8" and len(wire) != 2 * len(self.names):
            raise VerifyError("the update carries int8 scales for tensors it does not send: update the node")
        self.wire = wire
        self.reference = reference
        self.dtype = dtype

    def __getitem__(self, key: str) -> np.ndarray:
        if key.startswith(SCALE) or key not in self.wire:
            raise KeyError(key)
        x = self.wire[key]
        if self.dtype == "fp32":
            return x
        delta = from_bf16(x) if self.dtype == "bf16" else x.astype(np.float32) * self.wire[SCALE + key][0]
        delta += np.asarray(self.reference[key], dtype=np.float32)
        return delta

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape tensor `key` decodes to, without decoding it."""
        return tuple(self.wire[key].shape)


def _check(wire: dict[str, np.ndarray], reference: Mapping[str, np.ndarray], key: str, dtype: str,
           want: type) -> None:
    x = wire[key]
    if x.dtype != want:
        raise VerifyError(f"{key} arrived as {x.dtype}, the campaign asked for {dtype}: update the node")
    if dtype == "fp32":
        return
    if key not in reference or x.shape != reference[key].shape:
        raise VerifyError(f"{key} does not match the tensors the node was sent: update the node")
    if dtype == "int8":
        scale = wire.get(SCALE + key)
        if scale is None or scale.shape != (1,) or scale.dtype != np.float32:
            raise VerifyError(f"{key} arrived without its int8 scale: update the node")


def wire_bytes(wire: dict[str, np.ndarray]) -> int:
    """Payload bytes of an encoded update (what the upload costs, before Flower's framing)."""
    return sum(int(v.nbytes) for v in wire.values())
