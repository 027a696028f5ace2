"""Fetch DAGs into the local block store from any mix of sources, every block verified, every walk bounded.

    fetch_dag(cid, store, sources, bounds=file_bounds(size))    # one file, held to what it may cost
    signed = fetch_signed(root, store, sources)                   # a signed folder, step by step
    write_signed(store.get, signed, folder)                       # only what the signature covers

`fetch_signed` never takes more than the signed manifest promises, and checks each step before the next:

    1. the root block: a plain UnixFS directory holding a model.sig
    2. the model.sig: at most MAX_ENVELOPE_BYTES; signature, expiry and trust checked (nothing recorded)
    3. every directory below: exactly the folders the signed paths need, every entry a signed file under its
       signed CID (or the root's model.sig); anything else is refused before any file is fetched
    4. every file: at most the blocks, levels and bytes Kubo's layout gives its signed size, and exactly that
       size once walked with repeats counted
    5. every directory block, re-encoded from its checked entries, must be the block fetched: one root CID
       per signed content, so a re-wrapped copy can never stand in for the publisher's own

Blocks already held are not fetched again, so an interrupted pull resumes where it stopped; a source that
fails or lies (a block that does not hash to its CID, or one larger than any block we make) is skipped.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from protocol.content import dagpb, unixfs
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID, RAW
from protocol.content.unixfs import MAX_DEPTH, Bounds, block_links, file_bounds, measure_file, upto
from protocol.errors import CommonsError, VerifyError
from protocol.signing.dsse import MAX_ENVELOPE_BYTES
from protocol.signing.manifest import SIGNATURE_FILE, Verified, verify_envelope
from protocol.signing.trust import TrustPolicy, q

MAX_BLOCK = 2 << 20  # no block of ours is larger (leaves are 256 KiB); bitswap's limit too
NODE_OVERHEAD = 16 << 10  # block bytes one node may add to the content it carries (links, framing)
BATCH = 64  # blocks fetched in parallel before their bytes are let go
DIRECTORY = b"\x08\x01"  # UnixFS Data of a basic directory, as `ipfs add -r` writes it

Prefetch = Callable[[str, Bounds], None]


class BlockSource(Protocol):
    name: str

    def get_block(self, cid: str) -> bytes | None: ...


class Missing(CommonsError):
    """No source holds a block (a lying source is a VerifyError instead)."""


class NotSigned(VerifyError):
    """The root is not a folder holding a model.sig: nothing there can be checked."""


def _from_sources(cid: str, sources: Sequence[BlockSource], store: BlockStore) -> bytes:
    lied = []
    for source in sources:
        block = source.get_block(cid)
        if block is None:
            continue
        try:
            if len(block) > MAX_BLOCK:
                raise VerifyError(f"block {cid} is over {MAX_BLOCK} bytes")
            store.put(cid, block)  # re-hashes: a wrong block never lands
        except VerifyError:
            lied.append(source.name)
            continue
        return block
    if lied:  # a VerifyError: the caller can tell tampering from absence
        raise VerifyError(f"block {cid} from {', '.join(lied)} does not hash to its CID (tampered or "
                          "corrupt) and was refused; fetch from a source you trust")
    names = ", ".join(s.name for s in sources) or "no sources"
    raise Missing(f"block {cid} is not available from {names}: start a peer that holds it and retry")


def _block(cid: str, store: BlockStore, sources: Sequence[BlockSource]) -> bytes:
    return store.get(cid) if store.has(cid) else _from_sources(cid, sources, store)


def fetch_dag(root: str, store: BlockStore, sources: Sequence[BlockSource], progress: bool = True,
              workers: int = 8, bounds: Bounds | None = None, name: str = "") -> int:
    """Make the store hold every block under `root`; returns how many blocks were fetched.

    Each block is fetched once however often it is linked, level by level. With `bounds`, the walk is refused
    (VerifyError) before fetching past bounds.links blocks, bounds.depth levels or the bytes those may take.
    """
    from tqdm import tqdm

    label = name or root
    bar = tqdm(desc="pull", unit="B", unit_scale=True, disable=not progress or not sys.stderr.isatty(),
               file=sys.stderr)
    fetched = taken = depth = 0
    seen: set[str] = set()
    frontier = [root]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while frontier:
            depth += 1
            seen.update(frontier)
            _within(bounds, label, depth=depth, blocks=len(seen), size=taken)
            links: dict[str, list[str]] = {}  # a level's links, not its bytes: a 2 GiB file is 8192 leaves
            wanted = [c for c in frontier if not store.has(c)]
            for cid in set(frontier).difference(wanted):
                block = store.get(cid)
                links[cid], taken = block_links(cid, block), taken + len(block)
            for start in range(0, len(wanted), BATCH):  # at most BATCH blocks in memory at once
                batch = wanted[start:start + BATCH]
                for cid, block in zip(batch, pool.map(lambda c: _from_sources(c, sources, store), batch)):
                    links[cid], taken = block_links(cid, block), taken + len(block)
                    fetched += 1
                    bar.update(len(block))
                _within(bounds, label, depth=depth, blocks=len(seen), size=taken)
            following: dict[str, None] = {}
            for cid in frontier:
                following.update((child, None) for child in links[cid] if child not in seen)
                _within(bounds, label, depth=depth, blocks=len(seen) + len(following), size=taken)
            frontier = list(following)
    bar.close()
    return fetched


def _within(bounds: Bounds | None, label: str, *, depth: int, blocks: int, size: int) -> None:
    """VerifyError once a fetch passes what `bounds` allow (depth is held to MAX_DEPTH even without)."""
    most = bounds.depth if bounds is not None else MAX_DEPTH
    if depth > most:
        raise VerifyError(f"{label} nests deeper than {most} levels (a DAG bomb); refusing it")
    if bounds is None:
        return
    if blocks > bounds.links:
        raise VerifyError(f"{label} links more than the {bounds.links} blocks a {bounds.bytes}-byte file has "
                          "(a DAG bomb); refusing it")
    if size > bounds.bytes + bounds.links * NODE_OVERHEAD:
        raise VerifyError(f"{label} takes more than the {bounds.bytes} bytes promised for it; refusing it")


# --- a signed folder --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedDag:
    root: str
    envelope: bytes
    verified: Verified
    files: list[tuple[str, str, Bounds]]  # (path, CID, bounds): model.sig, then every signed file


def fetch_signed(root: str, store: BlockStore, sources: Sequence[BlockSource],
                 policy: TrustPolicy | None = None, *, envelope: bytes | None = None, progress: bool = False,
                 prefetch: Prefetch | None = None
                 ) -> SignedDag:
    """Steps 1-5 above; `envelope`, when given, must be the folder's own model.sig (an announcement).

    Raises NotSigned (not a signed folder at all), VerifyError (refused: nothing about it can be trusted),
    Missing (a block no source holds) or CommonsError (a source failed otherwise).
    """
    root = str(CID.decode(root))
    # 1. the root: a directory holding a model.sig
    root_block = _block(root, store, sources)
    try:
        entries = _directory(root, root_block) if CID.decode(root).codec != RAW else {}
    except CommonsError:
        entries = {}
    sig = entries.get(SIGNATURE_FILE)
    if sig is None:
        raise NotSigned(f"{root} is not a folder holding a {SIGNATURE_FILE}; "
                        "only signed folders are accepted")
    # 2. the envelope, bounded before it is read
    sig_cid, sig_bounds = str(sig.cid), upto(MAX_ENVELOPE_BYTES)
    fetch_dag(sig_cid, store, sources, progress=False, bounds=sig_bounds, name=SIGNATURE_FILE)
    held = b"".join(unixfs.iter_file(store.get, sig_cid, sig_bounds, SIGNATURE_FILE))
    if envelope is not None and held.strip() != bytes(envelope).strip():
        raise VerifyError(f"the {SIGNATURE_FILE} inside {root} differs from the envelope sent; announce the "
                          "directory's own manifest")
    verified = verify_envelope(held, policy)
    # 3. the folders: exactly what the signed paths need, before any file is fetched
    directories = _check_tree(root, root_block, entries, verified, store, sources)
    # 4. the files, each held to its signed size, and all of them to the disk the store is on
    room_for(verified, store.root)
    files = [(SIGNATURE_FILE, sig_cid, sig_bounds)]
    files += [(f["name"], f["cid"], file_bounds(f["size"])) for f in verified.files]
    tsizes = {}
    for path, cid, bounds in files:
        if cid not in tsizes:
            if prefetch is not None:
                prefetch(cid, bounds)
            fetch_dag(cid, store, sources, progress=progress, bounds=bounds, name=q(path))
            tsizes[cid] = measure_file(store.get, cid, bounds, q(path)).tsize
    # 5. one CID per content: the folders must be byte for byte what `ipfs add -r` makes of these files
    _check_canonical(root, directories, tsizes)
    return SignedDag(root, held, verified, files)


def room_for(verified: Verified, folder: Path) -> None:
    """CommonsError before fetching when the signed files could not fit: a signed manifest may promise
    terabytes, each file within its own bound. Blocks and the laid-out copy both land on this disk."""
    promised = sum(int(f["size"]) for f in verified.files)
    free = shutil.disk_usage(folder).free
    if 2 * promised > free:
        raise CommonsError(f"{verified.meta.name} promises {promised / 1e9:.1f} GB of files and needs twice "
                           f"that (blocks and the folder); {folder} has {free / 1e9:.1f} GB free: free space "
                           "or set COMMONS_HOME to a larger disk")


def _directory(root: str, block: bytes, path: str = "") -> dict[str, dagpb.Link]:
    """name -> link of a plain UnixFS directory block; VerifyError for anything else."""
    where = f"{q(path)} in {root}" if path else root
    try:
        links, data = dagpb.decode_node(block)
        kind = unixfs.decode_unixfs(data).type
    except CommonsError:
        kind = -1
    if kind != unixfs.T_DIRECTORY:
        raise VerifyError(f"{where} is not a plain UnixFS directory; refusing it")
    entries = {link.name: link for link in links}
    if len(entries) != len(links):
        raise VerifyError(f"{where} names an entry twice; refusing it")
    return entries


def _check_tree(root: str, root_block: bytes, entries: dict[str, dagpb.Link], verified: Verified,
                store: BlockStore, sources: Sequence[BlockSource]
                ) -> dict[str, tuple[bytes, dict[str, dagpb.Link]]]:
    """Every entry is a signed file (same CID) or a folder on a signed path; returns path -> (block,
    entries)."""
    signed = {f["name"]: str(CID.decode(f["cid"])) for f in verified.files}
    folders = {name.rsplit("/", i)[0] for name in signed for i in range(1, name.count("/") + 1)}
    children: dict[str, set[str]] = {"": {SIGNATURE_FILE}}
    for path in (*signed, *folders):
        parent, _, name = path.rpartition("/")
        children.setdefault(parent, set()).add(name)
    directories = {"": (root_block, entries)}
    pending = [""]
    while pending:
        folder = pending.pop()
        prefix = f"{folder}/" if folder else ""
        links = directories[folder][1]
        for name, link in links.items():
            path = prefix + name
            if name not in children.get(folder, ()):
                raise VerifyError(f"{q(path)} in {root} is not covered by {SIGNATURE_FILE}; refusing it")
            if path in folders:
                block = _block(str(link.cid), store, sources)
                directories[path] = (block, _directory(root, block, path))
                pending.append(path)
            elif path in signed and str(link.cid) != signed[path]:
                raise VerifyError(f"{q(path)} in {root} is not the file {SIGNATURE_FILE} signs (its CID "
                                  "differs); refusing it")
        absent = sorted(children.get(folder, set()) - set(links))
        if absent:
            raise VerifyError(f"{q(prefix + absent[0])} is listed in {SIGNATURE_FILE} but missing from "
                              f"{root}; refusing it")
    return directories


def _check_canonical(root: str, directories: dict[str, tuple[bytes, dict[str, dagpb.Link]]],
                     tsizes: dict[str, int]) -> None:
    """Re-encode every folder from its checked entries, deepest first; each must be the block fetched."""
    sizes = dict(tsizes)
    for folder in sorted(directories, key=lambda p: -p.count("/") - (p != "")):
        block, links = directories[folder]
        children = sorted(links.values(), key=lambda link: link.name.encode("utf-8"))
        rebuilt = dagpb.encode_node([dagpb.Link(link.cid, link.name, sizes[str(link.cid)])
                                     for link in children],
                                    DIRECTORY)
        if rebuilt != block:
            where = f"folder {q(folder)}" if folder else "its root"
            raise VerifyError(f"{root} is not the DAG `ipfs add -r` makes of the signed files ({where} "
                              "differs); refusing it")
        sizes[str(CID.decode(_cid_of(root, folder, directories)))] = len(block) + sum(
            sizes[str(link.cid)] for link in children)


def _cid_of(root: str, folder: str, directories: dict[str, tuple[bytes, dict[str, dagpb.Link]]]) -> str:
    if not folder:
        return root
    parent, _, name = folder.rpartition("/")
    return str(directories[parent][1][name].cid)


def write_signed(get_block: unixfs.GetBlock, signed: SignedDag, folder: Path) -> None:
    """model.sig and every signed file under `folder`, each held to its bounds; nothing else."""
    for path, cid, bounds in signed.files:
        unixfs.write_file(get_block, cid, Path(folder) / path, bounds, q(path))
