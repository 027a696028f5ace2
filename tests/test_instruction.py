"""The coordinator's train instruction and the node's query answer are types (protocol/instruction.py):
the wire is the flat ConfigRecord both sides always exchanged, and a malformed value is refused in one
line that names its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from coordinator.campaign import parse
from coordinator.rounds import capabilities, train_instruction
from protocol.errors import CommonsError
from protocol.instruction import Capability, NodeInfo, TrainInstruction

CID = "QmTz3oc4gdpRMKP2sdGUPZTAGRngqjsi99BPoztyP53JMM"
LORA = {"alpha": 8, "dropout": 0.05, "r": 4, "seed": 7, "target_modules": ["q_proj", "v_proj"]}
# What the coordinator has always sent for this campaign (the golden wire: keys, order, JSON strings).
WIRE = {
    "campaign": "dates", "round": 3, "base_model": "commons/tiny-random-llama", "base_revision": "main",
    "lora": json.dumps(LORA, sort_keys=True), "keys": json.dumps(["a.lora_A.weight", "a.lora_B.weight"]),
    "upload_dtype": "int8", "quantization": "nf4", "steps": 5, "batch_size": 4, "lr": 0.002, "max_length": 64,
    "seed": 7, "data": "campaign", "datasets": json.dumps([CID, CID]), "data_source": "http://index:8000",
    "data_slot": 1, "data_slots": 3,
}
REQUIRED = ("campaign", "round", "base_model", "base_revision", "lora", "steps", "batch_size", "lr",
            "max_length")
# what an older node without a GPU reports: no ram_free_gb, no gpu
REPORT = {"device": "cpu", "vram_gb": None, "cpu_cores": 2, "ram_gb": 4.0, "bf16": False}
INFO = {"public_key": "ab" * 32, "peer_id": "12D3KooW", "capability": json.dumps(REPORT), "examples": 8}


SAME_VERSION = "run the same lora-commons version on coordinator and node"


def refusal(build, config: dict) -> str:
    with pytest.raises(CommonsError) as err:
        build(config)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_the_coordinator_builds_the_wire_it_always_sent_and_the_node_reads_it_back(tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text("")
    raw = {"name": "dates", "base_model": "tiny", "base_revision": "main", "eval_file": "eval.jsonl",
           "upload_dtype": "int8", "quantization": "nf4", "data": "campaign", "data_source": "http://index:8000",
           "datasets": [{"cid": CID}, {"cid": CID}], "lora": LORA,
           "train": {"steps": 5, "batch_size": 4, "lr": 0.002, "max_length": 64}}
    campaign = parse(raw, tmp_path)

    instruction = train_instruction(campaign, 3, ["a.lora_A.weight", "a.lora_B.weight"], (1, 3))
    received = TrainInstruction.from_config(dict(ConfigRecord(instruction.to_config())))

    assert list(instruction.to_config().items()) == list(WIRE.items())
    assert received == instruction
    assert received.lora == LORA and received.keys == ("a.lora_A.weight", "a.lora_B.weight")
    assert (received.datasets, received.data_slot, received.data_slots) == ((CID, CID), 1, 3)


def test_a_local_data_instruction_carries_no_dataset_fields() -> None:
    local = TrainInstruction.from_config({**WIRE, "data": "local"})
    assert (local.data, local.datasets, local.data_source) == ("local", (), "")
    assert "datasets" not in local.to_config() and "data_slot" not in local.to_config()


@pytest.mark.parametrize("key", REQUIRED)
def test_a_missing_required_key_is_one_line_naming_it(key: str) -> None:
    wire = {k: v for k, v in WIRE.items() if k != key}
    message = refusal(TrainInstruction.from_config, wire)
    assert message == f"the coordinator's instruction has no {key}: {SAME_VERSION}"


@pytest.mark.parametrize("key", ["datasets", "data_slot", "data_slots"])
def test_campaign_data_without_its_slice_is_one_line_naming_the_key(key: str) -> None:
    wire = {k: v for k, v in WIRE.items() if k != key}
    assert f"has no {key}:" in refusal(TrainInstruction.from_config, wire)


def test_keys_an_older_coordinator_leaves_out_take_their_defaults_and_unknown_keys_are_ignored() -> None:
    oldest = {k: WIRE[k] for k in REQUIRED}
    instruction = TrainInstruction.from_config({**oldest, "from_the_future": "x"})
    assert (instruction.keys, instruction.upload_dtype, instruction.quantization, instruction.seed) == (
        None, "fp32", "auto", 0)
    assert (instruction.data, instruction.data_slots) == ("local", 1)
    assert TrainInstruction.from_config({**oldest, "keys": "", "data": ""}) == instruction  # empty: not sent
    assert TrainInstruction.from_config({**WIRE, "keys": "[]"}).keys == ()  # nothing: not the whole adapter


@pytest.mark.parametrize(("key", "value", "named"), [
    ("campaign", 1, "campaign = 1, not a string"),
    ("round", "3", "round = '3', not a whole number"),
    ("round", True, "round = True, not a whole number"),
    ("base_model", ["tiny"], "base_model = ['tiny'], not a string"),
    ("base_revision", 2, "base_revision = 2, not a string"),
    ("lora", "{", "lora = '{', not a JSON object"),
    ("lora", "[4]", "lora = '[4]', not a JSON object"),
    ("lora", '{"r": "8"}', "lora.r = '8', not a whole number"),
    ("keys", "a.lora_A.weight", "keys = 'a.lora_A.weight', not a JSON list of strings"),
    ("keys", "[1, 2]", "keys = '[1, 2]', not a JSON list of strings"),
    ("upload_dtype", 8, "upload_dtype = 8, not a string"),
    ("quantization", 4, "quantization = 4, not a string"),
    ("steps", 5.0, "steps = 5.0, not a whole number"),
    ("batch_size", "4", "batch_size = '4', not a whole number"),
    ("lr", "nan", "lr = 'nan', not a number"),
    ("max_length", b"64", "max_length = b'64', not a whole number"),
    ("seed", "7", "seed = '7', not a whole number"),
    ("data", 1, "data = 1, not a string"),
    ("datasets", "{", "datasets = '{', not a JSON list of strings"),
    ("data_source", 8000, "data_source = 8000, not a string"),
    ("data_slot", "1", "data_slot = '1', not a whole number"),
    ("data_slots", 3.0, "data_slots = 3.0, not a whole number"),
])
def test_each_malformed_field_is_one_line_naming_the_key(key: str, value: object, named: str) -> None:
    message = refusal(TrainInstruction.from_config, {**WIRE, key: value})
    assert message == f"the coordinator's instruction has {named}: {SAME_VERSION}"


def test_a_data_mode_this_node_does_not_know_asks_for_an_update() -> None:
    assert refusal(TrainInstruction.from_config, {**WIRE, "data": "shared"}) == (
        "the coordinator asked for data = 'shared'; this node knows local, campaign: update the node "
        "(pip install -U lora-commons)")


def test_an_integer_lr_is_read_as_the_number_it_is() -> None:
    assert TrainInstruction.from_config({**WIRE, "lr": 1}).lr == 1.0


def test_the_nodes_query_answer_is_the_report_it_always_sent_and_the_coordinator_reads_it_back() -> None:
    gpu = {"device": "cuda", "vram_gb": 23.5, "cpu_cores": 8, "ram_gb": 64.0, "ram_free_gb": 50.1,
           "bf16": True, "gpu": "NVIDIA H100"}  # node.hardware.detect's keys, in its order
    capability = Capability.from_report(gpu)
    info = NodeInfo(public_key="ab" * 32, peer_id="12D3KooW", capability=capability, examples=8)

    wire = info.to_config()
    received = NodeInfo.from_config(dict(ConfigRecord(wire)))

    assert wire == {**INFO, "capability": json.dumps(gpu)}
    assert received == info and received.capability.to_report() == gpu


def test_a_report_an_older_node_sent_plans_as_before() -> None:
    capability = NodeInfo.from_config(INFO).capability
    assert capability.to_report() == {**REPORT, "ram_free_gb": None}
    assert NodeInfo.from_config({"capability": json.dumps({"device": "mps"})}) == NodeInfo(
        capability=Capability(device="mps"))  # no key, no peer id, no count: what the coordinator assumed


@pytest.mark.parametrize(("change", "named"), [
    ({"capability": json.dumps({**REPORT, "device": "tpu"})}, "device = 'tpu', not one of cuda, mps, cpu"),
    ({"capability": json.dumps({**REPORT, "cpu_cores": "2"})}, "cpu_cores = '2', not a whole number"),
    ({"capability": json.dumps({**REPORT, "vram_gb": "24"})}, "vram_gb = '24', not a number"),
    ({"capability": json.dumps({**REPORT, "bf16": 1})}, "bf16 = 1, not true or false"),
    ({"capability": json.dumps({k: v for k, v in REPORT.items() if k != "device"})}, "no device"),
    ({"capability": "[]"}, "capability = '[]', not a JSON object"),
    ({"capability": None}, "no capability"),
    ({"examples": "8"}, "examples = '8', not a whole number"),
    ({"public_key": 7}, "public_key = 7, not a string"),
])
def test_a_malformed_query_answer_is_one_line_naming_the_key(change: dict, named: str) -> None:
    message = refusal(NodeInfo.from_config, {**INFO, **change})
    assert named in message and message.endswith(": update the node")


def test_the_coordinator_plans_only_nodes_whose_report_reads_and_names_the_bad_key() -> None:
    said = []
    bad = {**INFO, "public_key": "cd" * 32, "capability": json.dumps({**REPORT, "device": "tpu"})}

    nodes = capabilities({1: INFO, 2: bad}, lambda event, **fields: said.append((event, fields)))

    assert nodes == {INFO["public_key"]: (1, {**REPORT, "ram_free_gb": None})}
    reason = "the node's capability report has device = 'tpu', not one of cuda, mps, cpu: update the node"
    assert said == [("node_ignored", {"node": "cd" * 8, "reason": reason})]
