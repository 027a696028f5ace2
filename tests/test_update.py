"""Update encoding on the wire (fp32 | bf16 | int8 deltas) and the signature over what is sent."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.errors import VerifyError
from protocol.signing.keys import Identity, verify_signature
from protocol.update import decode, encode, from_bf16, to_bf16, update_digest, wire_bytes


@pytest.fixture
def pair() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    sent = {"m.lora_A.weight": rng.standard_normal((8, 64), dtype=np.float32) * 0.1,
            "m.lora_B.weight": np.zeros((64, 8), dtype=np.float32)}
    trained = {k: v + rng.standard_normal(v.shape, dtype=np.float32) * 0.01 for k, v in sent.items()}
    return sent, trained


@pytest.mark.parametrize(("dtype", "size", "tolerance"),
                         [("fp32", 1.0, 0.0), ("bf16", 0.5, 4e-3), ("int8", 0.25, 9e-3)])
def test_round_trip_error_is_relative_to_the_delta_and_bytes_shrink(pair, dtype: str, size: float,
                                                                    tolerance: float) -> None:
    sent, trained = pair
    wire = encode(trained, sent, dtype)
    back = decode(wire, sent, dtype)
    for k in trained:
        delta = trained[k] - sent[k]
        assert np.abs(back[k] - trained[k]).max() <= tolerance * np.abs(delta).max() + 1e-12
    assert wire_bytes(wire) <= size * wire_bytes(encode(trained, sent, "fp32")) + 8 * len(trained)


def test_bf16_rounds_to_nearest_even() -> None:
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5e-3], dtype=np.float32)
    back = from_bf16(to_bf16(x))
    assert back[:3].tolist() == [1.0, 1.0, 1.0 + 2**-6]  # both ties go to the even mantissa
    assert abs(back[3] - x[3]) <= abs(x[3]) * 2**-8


def test_the_signature_covers_the_encoded_bytes(pair) -> None:
    sent, trained = pair
    node = Identity.generate()
    wire = encode(trained, sent, "int8")
    signature = node.sign(update_digest("c", 1, wire))
    assert verify_signature(node.public_key, update_digest("c", 1, wire), signature)
    tampered = {**wire, "m.lora_A.weight": wire["m.lora_A.weight"].copy()}
    tampered["m.lora_A.weight"][0, 0] ^= 1
    assert not verify_signature(node.public_key, update_digest("c", 1, tampered), signature)
    assert not verify_signature(node.public_key, update_digest("c", 2, wire), signature)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda w: {**w, "m.lora_A.weight": w["m.lora_A.weight"].astype(np.int16)},
         "campaign asked for int8"),
        (lambda w: {k: v for k, v in w.items() if k != "scale:m.lora_A.weight"}, "without its int8 scale"),
        (lambda w: {**w, "m.lora_A.weight": w["m.lora_A.weight"][:4]}, "does not match the tensors"),
    ],
)
def test_malformed_wire_is_a_one_line_verify_error(pair, mutate, fragment: str) -> None:
    sent, trained = pair
    with pytest.raises(VerifyError) as err:
        decode(mutate(encode(trained, sent, "int8")), sent, "int8")
    assert fragment in str(err.value) and "\n" not in str(err.value)
