"""Test-only Flower ClientApp: an honest volunteer unless its node config says `attack = "wrongkey"`,
then it signs its update with a key other than the one it registered (what a forger would do).
tests/test_federation_e2e.py starts SuperNodes with this module on PYTHONPATH; production never sees it."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from node import client_app
from protocol.keys import Identity
from protocol.update import update_digest

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client_app.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    if context.node_config.get("attack") == "wrongkey":
        forger = Identity.generate()
        wire = {k: v.numpy() for k, v in reply.content["adapter"].items()}
        config = msg.content["config"]
        digest = update_digest(str(config["campaign"]), int(config["round"]), wire)
        reply.content["proof"] = ConfigRecord({"public_key": forger.public_hex, "signature": forger.sign(digest).hex()})
    return reply
