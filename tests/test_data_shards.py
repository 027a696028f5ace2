"""Data shards: with data = "campaign" each node fetches the campaign's signed datasets by CID from a real
index on loopback (every block hash-checked) and trains on its own disjoint slice of the records."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from commons.datasets import publish_dataset
from commons.demo_task import LICENSE, SOURCE, write_demo_data
from coordinator.campaign import Campaign, load
from coordinator.rounds import train_instruction
from index.app import create_app
from index.db import IndexDB
from node.data import local_examples, node_slice, training_records
from node.settings import NodeSettings
from protocol.content import unixfs
from protocol.content.blockstore import BlockStore
from protocol.data.records import read_records
from protocol.errors import CommonsError, VerifyError
from protocol.instruction import TrainInstruction


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(store: BlockStore) -> Iterator[str]:
    """The index app (its trustless gateway included) over `store`, on a loopback port, in a thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(IndexDB(), store), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class Tampering(BlockStore):
    """An index store that serves one block with a flipped byte: a lying or corrupted gateway."""

    victim = ""

    def get(self, cid: str) -> bytes:
        block = super().get(cid)
        return bytes([block[0] ^ 1]) + block[1:] if cid == self.victim else block


def publish(tmp_path: Path, files: int = 2, per_file: int = 5) -> tuple[list[str], list[dict]]:
    """Signed commons datasets in the test's COMMONS_HOME (the index's home): CIDs and all records."""
    data = write_demo_data(tmp_path / "raw", files, per_file, 2)
    cids = [publish_dataset(f, LICENSE, SOURCE, name=f"shard-{i}")["cid"]
            for i, f in enumerate(data["train"])]
    records = [r for f in data["train"] for r in read_records(f)]
    return cids, records


def campaign(tmp_path: Path, cids: list[str], source: str) -> Campaign:
    (tmp_path / "test.jsonl").write_text("{}\n")
    return Campaign(name="c", base_model="tiny", eval_file=tmp_path / "test.jsonl", data="campaign",
                    data_source=source, datasets=[{"cid": c, "name": f"d{i}", "license": LICENSE}
                                                  for i, c in enumerate(cids)])


def node(tmp_path: Path, name: str) -> NodeSettings:
    return NodeSettings(home=tmp_path / name, data=tmp_path / name / "no-local-data.jsonl")


def messages(records: list[dict]) -> list[str]:
    return [json.dumps(r["messages"], sort_keys=True) for r in records]


@pytest.mark.parametrize("total", [1, 2, 7, 12, 100])
def test_slices_are_disjoint_and_cover_every_record_exactly_once(total: int) -> None:
    records = list(range(total))
    for slots in range(1, total + 1):
        slices = [node_slice(records, s, slots) for s in range(slots)]
        assert sorted(x for sl in slices for x in sl) == records  # complete, and nothing twice
        assert max(map(len, slices)) - min(map(len, slices)) <= 1  # balanced


def test_fewer_records_than_nodes_is_a_one_line_error_naming_the_fix() -> None:
    with pytest.raises(CommonsError) as err:
        node_slice([1, 2], 2, 3)
    assert "fewer than the 3 nodes" in str(err.value) and "\n" not in str(err.value)


def test_nodes_fetch_from_a_real_index_into_empty_homes_and_split_the_records(tmp_path: Path) -> None:
    cids, records = publish(tmp_path, files=2, per_file=5)
    with serve(BlockStore()) as url:
        c = campaign(tmp_path, cids, url)
        homes = [node(tmp_path, f"node{i}") for i in range(3)]
        assert all(local_examples(h) == 0 for h in homes)  # none has local data
        got = [training_records(h, train_instruction(c, 1, [], (i, 3))) for i, h in enumerate(homes)]
    assert [len(g) for g in got] == [4, 3, 3]
    assert sorted(messages([r for g in got for r in g])) == sorted(messages(records))
    assert got[0][0]["messages"] == records[0]["messages"] and got[1][0]["messages"] == records[1]["messages"]
    for h in homes:  # the whole DAG, verified, now in each node's own block store
        assert all(not BlockStore(h.home / "blocks").missing(cid) for cid in cids)
    again = training_records(homes[2], train_instruction(c, 2, [], (2, 3)))  # held locally now: no source
    assert again == got[2]


def test_a_tampered_block_is_refused_and_never_stored(tmp_path: Path) -> None:
    cids, _ = publish(tmp_path, files=1)
    lying = Tampering()
    files = {p: c for p, c, _ in unixfs.list_directory(lying.get, cids[0])}
    lying.victim = files["data.jsonl"]
    with serve(lying) as url, pytest.raises(VerifyError) as err:
        training_records(node(tmp_path, "n"), train_instruction(campaign(tmp_path, cids, url), 1, [], (0, 1)))
    assert "does not hash to its CID" in str(err.value) and "\n" not in str(err.value)
    assert not BlockStore(tmp_path / "n" / "blocks").has(lying.victim)


def test_unknown_cid_unsigned_folder_and_missing_source_are_one_line_errors(tmp_path: Path) -> None:
    store = BlockStore()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.jsonl").write_text((tmp_path / "x").as_posix())
    unsigned = store.add_path(tmp_path / "plain")
    single = store.add_path(tmp_path / "plain" / "data.jsonl")
    elsewhere = BlockStore(tmp_path / "elsewhere").add_path(tmp_path / "plain" / "data.jsonl", cid_version=1)
    with serve(store) as url:
        cases = {elsewhere: "was not found at", unsigned: "is not a commons dataset",
                 single: "is not a commons dataset"}
        for i, (cid, fragment) in enumerate(cases.items()):
            instruction = train_instruction(campaign(tmp_path, [cid], url), 1, [], (0, 1))
            with pytest.raises(CommonsError) as err:
                training_records(node(tmp_path, f"n{i}"), instruction)
            assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(CommonsError, match="sets no data_source"):
        training_records(node(tmp_path, "n9"), train_instruction(campaign(tmp_path, [unsigned], ""), 1, []))


def test_campaign_data_fields_load_and_mistakes_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text("{}\n")
    head = 'name = "x"\nbase_model = "tiny"\neval_file = "test.jsonl"\n'
    cid = "QmTz3oc4gdpRMKP2sdGUPZTAGRngqjsi99BPoztyP53JMM"
    path = tmp_path / "c.toml"
    path.write_text(head + 'data = "campaign"\ndata_source = "http://index:8000"\n[[datasets]]\n'
                           f'cid = "{cid}"\n')
    c = load(path)
    config = train_instruction(c, 3, ["k"], (1, 4)).to_config()
    assert (config["data"], json.loads(config["datasets"]), config["data_slot"], config["data_slots"],
            config["data_source"]) == ("campaign", [cid], 1, 4, "http://index:8000")
    assert train_instruction(load(tmp_path / "c.toml"), 1, []).to_config()["data"] == "campaign"
    for text, fragment in [('data = "shared"\n', "use one of local, campaign"),
                           ('data = "campaign"\n', "needs at least one [[datasets]]"),
                           ('data = "campaign"\n[[datasets]]\ncid = "nope"\n', "needs cid = a dataset CID"),
                           ('data_source = "index:8000"\n', "not a gateway URL")]:
        path.write_text(head + text)
        with pytest.raises(CommonsError) as err:
            load(path)
        assert fragment in str(err.value) and "\n" not in str(err.value)
    path.write_text(head)
    local = train_instruction(load(path), 1, []).to_config()
    assert local["data"] == "local" and "datasets" not in local


def test_local_mode_still_reads_the_nodes_own_file(tmp_path: Path) -> None:
    data = write_demo_data(tmp_path / "raw", 1, 4, 1)
    settings = NodeSettings(home=tmp_path / "n", data=data["train"][0])
    wire = {"campaign": "c", "round": 1, "base_model": "tiny", "base_revision": "main", "lora": "{}",
            "steps": 1, "batch_size": 1, "lr": 0.1, "max_length": 8}
    local = TrainInstruction.from_config({**wire, "data": "local"})
    assert len(training_records(settings, local)) == 4 == local_examples(settings)
    older = TrainInstruction.from_config(wire)  # an older coordinator sends no `data` key
    assert len(training_records(settings, older)) == 4
    assert os.environ["COMMONS_HOME"]  # the index home, separate from every node's home


@pytest.mark.slow  # real SuperLink + 2 SuperNodes with the tiny model: ~40 s
def test_a_campaign_with_campaign_data_trains_each_node_on_its_slice(tmp_path: Path) -> None:
    from test_federation_e2e import TestNetwork, ended, start, wait_for

    cids, records = publish(tmp_path, files=2, per_file=6)
    # The volunteers hold no local data at all: everything they train on comes from the campaign's CIDs.
    decoys = write_demo_data(tmp_path / "decoy", 2, 3, 1)
    absent = [tmp_path / f"no-local-data-{i}.jsonl" for i in range(2)]
    with serve(BlockStore()) as url:
        path = tmp_path / "campaign.toml"
        path.write_text(
            f'name = "life"\nbase_model = "tiny"\neval_file = "{decoys["test"]}"\nrounds = 1\nmin_nodes = 2\n'
            f'eval_size = 1\nround_timeout = 120\nnode_wait = 120\ndata = "campaign"\ndata_source = "{url}"\n'
            "[train]\nsteps = 1\nbatch_size = 2\nmax_length = 48\n"
            + "".join(f'[[datasets]]\ncid = "{c}"\nname = "shard-{i}"\nlicense = "{LICENSE}"\n'
                      for i, c in enumerate(cids))
        )
        net = TestNetwork(tmp_path / "net")
        try:
            start(net, tmp_path, absent)
            net.submit({"campaign": str(path), "home": str(tmp_path / "coord")})
            log = wait_for(tmp_path, ended, 120)
        finally:
            net.close()
    end = next(e for e in log if e["event"] == "round_end")
    assert end["accepted"] == 2
    for i in range(2):
        home = tmp_path / f"node{i}"
        assert "training 1 steps on 6 local records" in (home / "logs" / "node.log").read_text()
        assert all(not BlockStore(home / "blocks").missing(cid) for cid in cids)
    assert len(records) == 12
