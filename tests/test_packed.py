"""Adapters cross Flower as one buffer and its layout (protocol/packed.py), not one object per tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from protocol.packed import LAYOUT, PACKED, pack, unpack
from protocol.update import encode


def adapter(layers: int = 30) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"model.layers.{i}.self_attn.{m}.lora_{ab}.weight": rng.normal(size=(8, 64)).astype(np.float32)
            for i in range(layers) for m in ("q_proj", "v_proj") for ab in "AB"}


def test_a_whole_adapter_travels_as_two_arrays_and_comes_back_bit_identical() -> None:
    tensors = adapter()
    record = pack(tensors)
    assert set(record) == {PACKED, LAYOUT} and len(tensors) == 120
    back = unpack(record)
    assert sorted(back) == sorted(tensors)
    assert all(np.array_equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
    assert back[min(back)].flags.writeable  # the node trains into them


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_every_upload_encoding_round_trips(dtype: str) -> None:
    sent = adapter(2)
    trained = {k: v + np.float32(0.01) for k, v in sent.items()}
    wire = encode(trained, sent, dtype)
    back = unpack(pack(wire))
    assert ({k: (v.dtype, v.shape) for k, v in back.items()}
            == {k: (v.dtype, v.shape) for k, v in wire.items()})
    assert all(np.array_equal(back[k], wire[k]) for k in wire)


def test_scalars_and_empty_arrays_survive() -> None:
    odd = {"a": np.float32(3.5).reshape(()), "b": np.zeros((0, 4), np.float32),
           "c": np.arange(3, dtype=np.int8)}
    back = unpack(pack(odd))
    assert back["a"].shape == () and float(back["a"]) == 3.5 and back["b"].shape == (0, 4)
    assert back["c"].tolist() == [0, 1, 2]


def test_a_record_of_separate_arrays_is_read_as_it_is() -> None:
    legacy = {"x": np.ones(3, np.float32)}
    assert unpack(legacy) is legacy


def forged(layout: object, buffer: bytes = b"\0" * 16) -> dict[str, np.ndarray]:
    return {PACKED: np.frombuffer(buffer, np.uint8),
            LAYOUT: np.frombuffer(json.dumps(layout).encode(), np.uint8)}


@pytest.mark.parametrize("layout, says", [
    ([["x", "<f4", [2], 0, 8], ["y", "<f4", [4], 4, 16]], "does not tile"),  # overlapping
    ([["x", "<f4", [8], 0, 32]], "runs past the buffer"),
    ([["x", "<f4", [2], 0, 8]], "bytes no layout entry names"),  # bytes left over
    ([["x", "|O", [2], 0, 16]], "malformed"),  # objects: never
    ([["x", "<f4", [-1], 0, 16]], "malformed"),
    ({"x": 1}, "not a list"),
    ([["x", "<f4", [2], 0, 8], ["x", "<f4", [2], 8, 8]], "repeats a key"),
])
def test_a_forged_layout_is_refused_in_one_line(layout: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        unpack(forged(layout))


def test_a_layout_that_is_not_json_is_refused() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        unpack({PACKED: np.zeros(4, np.uint8), LAYOUT: np.frombuffer(b"\xff{", np.uint8)})
