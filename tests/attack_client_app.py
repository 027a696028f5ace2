"""Test-only Flower ClientApp: an honest volunteer unless its node config names an `attack`.

- "wrongkey": signs its update with a key other than the one it registered (what a forger would do);
- "scale50", "sign_flip", "noise", "nan": trains honestly, rewrites the trained tensors with `poison`,
  re-encodes them in the campaign's upload dtype and signs them with the node's REAL key, so the
  signature verifies: what a malicious volunteer (not a forger) does. Only the aggregation can stop it.

tests/test_federation_e2e.py and tests/test_poisoning_e2e.py start SuperNodes with this module on
PYTHONPATH; tests/test_poisoning_demo.py imports `poison`. Production never sees it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from node import client_app
from protocol.instruction import TrainInstruction
from protocol.packed import pack, unpack
from protocol.signing.keys import Identity
from protocol.update import SCALE, decode, encode, update_digest

ATTACKS = ("scale50", "sign_flip", "noise", "nan")
NOISE_STD = 1.0  # far above an honest round's parameter change (~1e-2 per entry)

app = ClientApp()


def poison(attack: str, sent: dict[str, np.ndarray], trained: dict[str, np.ndarray],
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The malicious tensors for the keys of `trained`, from the global `sent` and an honest result."""
    if attack == "scale50":
        return {k: sent[k] + np.float32(50) * (v - sent[k]) for k, v in trained.items()}
    if attack == "sign_flip":  # boosted ×4 so that it outweighs the three honest nodes under fedavg
        return {k: sent[k] - np.float32(4) * (v - sent[k]) for k, v in trained.items()}
    if attack == "noise":
        return {k: sent[k] + rng.normal(scale=NOISE_STD, size=v.shape).astype(np.float32)
                for k, v in trained.items()}
    if attack == "nan":
        return {k: np.full_like(v, np.nan) for k, v in trained.items()}
    raise ValueError(f"unknown attack {attack!r}; use one of {', '.join(ATTACKS)} or wrongkey")


def poison_wire(attack: str, wire: dict[str, np.ndarray], sent: dict[str, np.ndarray], dtype: str,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Decode an honest reply, poison it and encode it again exactly as an honest node would."""
    keys = [k for k in wire if not k.startswith(SCALE)]
    reference = {k: sent[k] for k in keys}
    bad = poison(attack, reference, decode(wire, reference, dtype), rng)
    with np.errstate(invalid="ignore"):  # NaN into int8 is undefined; its scale carries the NaN below
        out = encode(bad, reference, dtype)
    if attack == "nan" and dtype == "int8":  # int8 cannot carry NaN; its float32 scale can
        out.update({SCALE + k: np.array([np.nan], dtype=np.float32) for k in keys})
    return out


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client_app.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    attack = str(context.node_config.get("attack") or "")
    if not attack or reply.has_error():
        return reply
    instruction = TrainInstruction.from_config(dict(msg.content["config"]))
    wire = unpack({k: v.numpy() for k, v in reply.content["adapter"].items()})
    if attack == "wrongkey":
        signer = Identity.generate()
    else:
        sent = unpack({k: v.numpy() for k, v in msg.content["adapter"].items()})
        rng = np.random.default_rng(instruction.round)
        wire = poison_wire(attack, wire, sent, instruction.upload_dtype, rng)
        reply.content["adapter"] = ArrayRecord({k: Array(v) for k, v in pack(wire).items()})
        signer = client_app._settings(context).identity  # the key it registered: the signature verifies
    digest = update_digest(instruction.campaign, instruction.round, wire)
    reply.content["proof"] = ConfigRecord({"public_key": signer.public_hex,
                                           "signature": signer.sign(digest).hex()})
    return reply
