"""The records a node trains on this round: its own local file, or its slice of the campaign's datasets.

    >>> records = training_records(settings, instruction)   # a protocol.instruction.TrainInstruction

`instruction.data == "campaign"` (see `coordinator.rounds.train_instruction`) names the campaign's datasets
(`datasets`: dataset CIDs), where to fetch them (`data_source`: a trustless gateway such as the index,
`GET /ipfs/{cid}?format=raw`) and this node's slot (`data_slot` of `data_slots`). Each dataset
is taken from the node's block store (`<home>/blocks`) or fetched into it (blocks the gateway lacks come
over bitswap from the seeders its /routing/v1 lists, `protocol.p2p.routed`), every block hash-checked
against its CID and every walk held to what the signed manifest promises
(`protocol.content.fetch.fetch_signed`); it must be a signed commons dataset (`model.sig` of kind "dataset"
whose signature verifies, nothing in the folder it does not sign,
and a `data.jsonl` whose sha256 is the signed one).

Slicing rule: the records of every dataset, in the order the campaign lists the datasets and in file
order within each, form one sequence r_0 … r_{N−1}; the node in slot s of n trains on r_s, r_{s+n},
r_{s+2n}, … (strided, so every node sees a mix of every dataset, not one volunteer's data). The slots
0 … n−1 therefore partition the records: disjoint, and together every record exactly once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.settings import NodeSettings
from protocol.content import unixfs
from protocol.content.blockstore import BlockStore
from protocol.content.fetch import Missing, NotSigned, SignedDag, fetch_signed
from protocol.content.gateway import GatewaySource
from protocol.content.multiformats import CID
from protocol.data.records import read_records
from protocol.errors import CommonsError, VerifyError
from protocol.instruction import TrainInstruction
from protocol.p2p.routed import RoutedSource
from protocol.signing.trust import TrustPolicy

DATA_FILE = "data.jsonl"  # what `commons data publish` signs (commons.datasets.DATA_FILE)
_VERIFIED: dict[tuple[str, str], list[dict]] = {}  # (block store, CID) -> records, for the process's life


def training_records(settings: NodeSettings, instruction: TrainInstruction) -> list[dict]:
    """The local file, or this node's slice of the campaign's datasets (other modes never parse)."""
    if instruction.data == "local":
        return read_records(settings.data)
    store = BlockStore(settings.home / "blocks")
    records = campaign_records(instruction.datasets, store, instruction.data_source,
                               settings.home / "datasets")
    return node_slice(records, instruction.data_slot, instruction.data_slots)


def local_examples(settings: NodeSettings) -> int:
    """How many local records this node holds (0 without a local file: it can still train on a
    campaign's datasets), for the capability report."""
    return len(read_records(settings.data)) if settings.data.is_file() else 0


def node_slice(records: Sequence[Any], slot: int, slots: int) -> list:
    """The slot's records under the strided rule above; a one-line error when the slice is empty."""
    if not 0 <= slot < slots:
        raise CommonsError(f"data slot {slot} of {slots} is out of range; run the same lora-commons version "
                           "on coordinator and node")
    mine = list(records[slot::slots])
    if not mine:
        raise CommonsError(f"this node's slice ({slot + 1} of {slots}) of the campaign datasets is empty: "
                           f"they hold {len(records)} records, fewer than the {slots} nodes; publish more "
                           "records or run fewer nodes")
    return mine


def campaign_records(cids: Sequence[str], store: BlockStore, source: str, cache: Path) -> list[dict]:
    """Every record of every dataset, in campaign order."""
    if not cids:
        raise CommonsError('the campaign has data = "campaign" but lists no datasets; '
                           'add [[datasets]] cid = ... to the campaign file')
    out: list[dict] = []
    for cid in cids:
        out += dataset_records(cid, store, source, cache)
    return out


def dataset_records(cid: str, store: BlockStore, source: str, cache: Path) -> list[dict]:
    """The verified records of one commons dataset, fetched into `store` first when it lacks blocks."""
    key = (str(store.root), cid)
    if key not in _VERIFIED:
        data = verified_data(cid, store, source)
        _VERIFIED[key] = read_records(_cached(cache, cid, data))
    return _VERIFIED[key]


def verified_data(cid: str, store: BlockStore, source: str) -> bytes:
    """The bytes of `data.jsonl` in the signed commons dataset at `cid`, every fetch bounded by its manifest
    (`protocol.content.fetch.fetch_signed`: a DAG bomb is refused before a byte is cached);
    one-line errors."""
    signed = _fetch(cid, store, source)
    fix = "list only CIDs printed by `commons data publish` in [[datasets]]"
    meta = signed.verified.meta
    if meta.kind != "dataset":
        raise CommonsError(f"{cid} is a commons {meta.kind} ({meta.name}), not a dataset; {fix}")
    entry = next((f for f in signed.verified.files if f["name"] == DATA_FILE), None)
    if entry is None:
        raise CommonsError(f"{cid} is not a commons dataset (no {DATA_FILE}); {fix}")
    data = b"".join(unixfs.iter_file(store.get, entry["cid"], unixfs.file_bounds(entry["size"]), DATA_FILE))
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise VerifyError(f"{DATA_FILE} in dataset {cid} does not match its signature; "
                          "re-publish the dataset")
    return data


def _fetch(cid: str, store: BlockStore, source: str) -> SignedDag:
    try:
        CID.decode(cid)
    except (CommonsError, ValueError) as exc:
        raise CommonsError(f"dataset {cid!r} in the campaign is not a CID ({exc}); "
                           "fix [[datasets]] cid") from None
    sources = [GatewaySource(source), RoutedSource(source, cid)] if source else []
    try:  # the CID the coordinator chose pins the content: any valid signer will do
        return fetch_signed(cid, store, sources, TrustPolicy())
    except NotSigned:
        raise CommonsError(f"{cid} is not a commons dataset (not a signed folder); list only CIDs printed by "
                           "`commons data publish` in [[datasets]]") from None
    except VerifyError as exc:
        raise VerifyError(f"dataset {cid}: {exc}; use a data_source you trust") from None
    except Missing as exc:
        if not source:
            raise CommonsError(f"dataset {cid} is not in this node's block store and the campaign sets no "
                               'data_source: set data_source = "http://INDEX:8000" in the campaign '
                               'file') from None
        if not store.has(cid):
            raise CommonsError(f"dataset {cid} was not found at {source} (not published there, or the "
                               "gateway is down): publish it there with `commons data publish` or fix "
                               "data_source") from None
        raise CommonsError(f"dataset {cid} is incomplete at {source} ({exc})") from None
    finally:
        for each in sources:
            each.close()


def _cached(cache: Path, cid: str, data: bytes) -> Path:
    """A copy of the verified JSONL on disk, so record errors name a file and line the volunteer can open."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{cid}.jsonl"
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path
