"""UnixFS import and export giving exactly the CIDs Kubo's `ipfs add` gives.

Example:
    >>> file_cid(b"hello world\\n")
    'QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o'

Files: fixed 256 KiB chunks, balanced DAG of at most 174 links per node (go-unixfs / boxo balanced
builder). CIDv0: leaves are dag-pb UnixFS File nodes. CIDv1: leaves are raw blocks, internal nodes
dag-pb CIDv1. Directories: basic (unsharded) UnixFS directories, links sorted by name; hidden entries
(names starting with '.') are skipped as `ipfs add -r` does without `--hidden`. Directories so large
that Kubo would shard them into a HAMT are refused rather than given a CID Kubo would not produce.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from protocol.content import dagpb
from protocol.content.multiformats import CID, DAG_PB, RAW, varint_decode, varint_encode
from protocol.errors import CommonsError, VerifyError

CHUNK_SIZE = 262144
MAX_LINKS = 174
HAMT_THRESHOLD = 262144  # Kubo's default UnixFS sharding threshold (bytes of link estimates)
# levels any walk follows: a Kubo file of 2 GiB has 3, the deepest folder we publish a few more
MAX_DEPTH = 64
MAX_ENTRIES = 100_000  # entries a directory walk lists, repeats included

# UnixFS Data.Type values
T_RAW, T_DIRECTORY, T_FILE, T_METADATA, T_SYMLINK, T_HAMT = range(6)

OnBlock = Callable[[str, bytes], None]
Progress = Callable[[int], None]
GetBlock = Callable[[str], bytes]
Source = Path | str | bytes | bytearray | memoryview | BinaryIO


@dataclass(frozen=True)
class Entry:
    """A finished DAG node as its parent sees it."""

    cid: CID
    tsize: int  # cumulative: this block plus all blocks below it
    filesize: int  # bytes of file content below it (0 for directories)


# --- building ---------------------------------------------------------------------------------------


def _chunks(src: Source) -> Iterator[memoryview]:
    """Full CHUNK_SIZE chunks (only the last may be short), reusing one buffer: consume before next."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        view = memoryview(src).cast("B")
        for start in range(0, len(view), CHUNK_SIZE):
            yield view[start:start + CHUNK_SIZE]
        return
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.exists():
            raise CommonsError(f"no such file: {path}: check the path")
        if path.is_dir():
            raise CommonsError(f"{path} is a directory: import it with import_directory (or `commons cid` on "
                               "it)")
        with path.open("rb") as fh:
            yield from _chunks(fh)
        return
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    readinto = getattr(src, "readinto", None)
    while True:
        filled = 0
        while filled < CHUNK_SIZE:  # like Go's io.ReadFull: short reads from pipes must not cut chunks
            if readinto is not None:
                got = readinto(view[filled:])
            else:
                data = src.read(CHUNK_SIZE - filled)
                got = len(data)
                view[filled:filled + got] = data
            if not got:
                break
            filled += got
        if filled:
            yield view[:filled]
        if filled < CHUNK_SIZE:
            return


def _unixfs_file_data(filesize: int, blocksizes: list[int]) -> bytes:
    out = [b"\x08\x02\x18", varint_encode(filesize)]
    for size in blocksizes:
        out += (b"\x20", varint_encode(size))
    return b"".join(out)


class _FileBuilder:
    """Streams chunks into a balanced DAG; holds at most MAX_LINKS entries per tree level."""

    def __init__(self, cid_version: int, on_block: OnBlock | None) -> None:
        if cid_version not in (0, 1):
            raise CommonsError(f"unknown CID version {cid_version}: use 0 or 1")
        self.version = cid_version
        self.on_block = on_block
        self.levels: list[list[Entry]] = [[]]
        self.leaves = 0

    def add_chunk(self, chunk: memoryview) -> None:
        size = len(chunk)
        if self.version == 1:
            cid = CID(1, RAW, hashlib.sha256(chunk).digest())
            entry = Entry(cid, size, size)
            if self.on_block:
                self.on_block(str(cid), bytes(chunk))
        else:
            # dag-pb{Data: unixfs{Type: File, Data: chunk, filesize}} framed around the chunk, not copied
            n = varint_encode(size)
            inner_len = 3 + len(n) + size + 1 + len(n)
            prefix = b"\x0a" + varint_encode(inner_len) + b"\x08\x02\x12" + n
            suffix = b"\x18" + n
            digest = hashlib.sha256(prefix)
            digest.update(chunk)
            digest.update(suffix)
            cid = CID(0, DAG_PB, digest.digest())
            entry = Entry(cid, len(prefix) + size + len(suffix), size)
            if self.on_block:
                self.on_block(str(cid), b"".join((prefix, chunk, suffix)))
        self.leaves += 1
        self._push(0, entry)

    def _push(self, level: int, entry: Entry) -> None:
        self.levels[level].append(entry)
        if len(self.levels[level]) == MAX_LINKS:
            # A full group always becomes one parent, whatever follows.
            parent = self._node(self.levels[level])
            self.levels[level] = []
            if level + 1 == len(self.levels):
                self.levels.append([])
            self._push(level + 1, parent)

    def _node(self, children: list[Entry]) -> Entry:
        links = [dagpb.Link(child.cid, "", child.tsize) for child in children]
        filesize = sum(child.filesize for child in children)
        block = dagpb.encode_node(links, _unixfs_file_data(filesize, [c.filesize for c in children]))
        return _emit(block, self.version, self.on_block, sum(c.tsize for c in children), filesize)

    def finish(self) -> Entry:
        if self.leaves == 0:
            if self.version == 1:
                return self._leaf_empty_raw()
            return _emit(dagpb.encode_node([], b"\x08\x02\x18\x00"), 0, self.on_block, 0, 0)
        if self.leaves == 1:
            return self.levels[0][0]
        level = 0
        while True:
            pending = self.levels[level]
            if level + 1 == len(self.levels):
                self.levels.append([])
            if level > 0 and not any(self.levels[level + 1:]) and len(pending) == 1:
                return pending[0]
            if pending:
                # A trailing partial group is wrapped, never promoted (balanced builder semantics).
                self.levels[level + 1].append(self._node(pending))
                self.levels[level] = []
            level += 1

    def _leaf_empty_raw(self) -> Entry:
        cid = CID(1, RAW, hashlib.sha256(b"").digest())
        if self.on_block:
            self.on_block(str(cid), b"")
        return Entry(cid, 0, 0)


def _emit(block: bytes, version: int, on_block: OnBlock | None, children_tsize: int, filesize: int) -> Entry:
    cid = CID(version, DAG_PB, hashlib.sha256(block).digest())
    if on_block:
        on_block(str(cid), block)
    return Entry(cid, len(block) + children_tsize, filesize)


def _import_file_entry(
    src: Source, cid_version: int, on_block: OnBlock | None, progress: Progress | None
) -> Entry:
    builder = _FileBuilder(cid_version, on_block)
    for chunk in _chunks(src):
        builder.add_chunk(chunk)
        if progress:
            progress(len(chunk))
    return builder.finish()


def import_file(
    src: Source, cid_version: int = 0, on_block: OnBlock | None = None, *, progress: Progress | None = None
) -> str:
    """The CID `ipfs add` (default chunker and layout) gives src; on_block sees children first."""
    return str(_import_file_entry(src, cid_version, on_block, progress).cid)


def file_cid(src: Source, cid_version: int = 0) -> str:
    return import_file(src, cid_version)


def _directory_entry(
    path: Path, cid_version: int, on_block: OnBlock | None, progress: Progress | None
) -> Entry:
    children: list[tuple[bytes, Entry]] = []
    with os.scandir(path) as entries:
        for item in entries:
            if item.name.startswith("."):
                continue  # `ipfs add -r` skips hidden files unless --hidden
            child = Path(item.path)
            if item.is_symlink():
                raise CommonsError(f"{child} is a symlink: replace it with the file it points to")
            if item.is_dir():
                entry = _directory_entry(child, cid_version, on_block, progress)
            elif item.is_file():
                entry = _import_file_entry(child, cid_version, on_block, progress)
            else:
                raise CommonsError(f"{child} is not a regular file or directory: remove it")
            children.append((os.fsencode(item.name), entry))
    children.sort(key=lambda pair: pair[0])
    estimate = sum(len(name) + len(entry.cid.to_bytes()) for name, entry in children)
    links = [dagpb.Link(entry.cid, name.decode("utf-8", "surrogateescape"), entry.tsize)
             for name, entry in children]
    block = dagpb.encode_node(links, b"\x08\x01")
    if estimate >= HAMT_THRESHOLD or len(block) >= HAMT_THRESHOLD:
        raise CommonsError(
            f"{path} has too many entries for a basic directory (Kubo would shard it): split it into "
            "subfolders"
        )
    return _emit(block, cid_version, on_block, sum(entry.tsize for _, entry in children), 0)


def import_directory(
    path: Path, cid_version: int = 0, on_block: OnBlock | None = None, *, progress: Progress | None = None
) -> str:
    """The root CID `ipfs add -r path` prints; refuses symlinks."""
    path = Path(path)
    if path.is_symlink():
        raise CommonsError(f"{path} is a symlink: pass the directory it points to")
    if not path.is_dir():
        raise CommonsError(f"no such directory: {path}: check the path")
    if cid_version not in (0, 1):
        raise CommonsError(f"unknown CID version {cid_version}: use 0 or 1")
    return str(_directory_entry(path, cid_version, on_block, progress).cid)


# --- reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FSNode:
    type: int
    data: bytes
    filesize: int
    blocksizes: list[int]


def decode_unixfs(data: bytes | None) -> FSNode:
    if data is None:
        raise CommonsError("dag-pb block without UnixFS data: not a file or directory Kubo would make")
    kind, content, filesize, sizes = -1, b"", 0, []
    pos = 0
    while pos < len(data):
        key, pos = varint_decode(data, pos)
        if key & 7 == 2:
            length, pos = varint_decode(data, pos)
            if key >> 3 == 2:
                content = data[pos:pos + length]
            pos += length
        elif key & 7 == 0:
            value, pos = varint_decode(data, pos)
            number = key >> 3
            if number == 1:
                kind = value
            elif number == 3:
                filesize = value
            elif number == 4:
                sizes.append(value)
        else:
            raise CommonsError("corrupt UnixFS data: fetch the content again")
    return FSNode(kind, content, filesize, sizes)


def block_links(cid: str, block: bytes) -> list[str]:
    """CIDs of the children of a block (raw blocks have none)."""
    parsed = CID.decode(cid)
    if parsed.codec == RAW:
        return []
    if parsed.codec != DAG_PB:
        raise CommonsError(f"unsupported codec 0x{parsed.codec:x} in {cid}: only dag-pb and raw are handled")
    links, _ = dagpb.decode_node(block)
    return [str(link.cid) for link in links]


# --- bounded walks ----------------------------------------------------------------------------------
#
# A DAG is a graph, not a tree: one small block may link the same child a million times, or nest a
# thousand levels deep. Every walk below is iterative and counts what it visits *with* repeats, so it
# is refused (VerifyError, one line) as soon as it passes what the file can honestly take:
#
#                     root          ≤ `depth` levels       the file's bytes ≤ `bytes`
#                 /    |    \
#            node     node   node   ≤ `links` visits in all (a repeated child counts each time)
#           / | \
#       leaf leaf leaf


@dataclass(frozen=True)
class Bounds:
    """The most a walk of one file may visit: blocks (counted with repeats), content bytes, levels."""

    links: int
    bytes: int
    depth: int = MAX_DEPTH
    exact: bool = True  # the file must hold exactly `bytes` (False: at most)


def file_bounds(size: int) -> Bounds:
    """Exactly what Kubo's layout (CHUNK_SIZE leaves, ≤ MAX_LINKS per node) takes for a `size`-byte file."""
    level = max(1, -(-size // CHUNK_SIZE))
    nodes, depth = level, 1
    while level > 1:
        level = -(-level // MAX_LINKS)
        nodes += level
        depth += 1
    return Bounds(links=nodes, bytes=size, depth=depth)


def upto(limit: int) -> Bounds:
    """For a file known only to be at most `limit` bytes (a model.sig: nothing states its size)."""
    most = file_bounds(limit)
    return Bounds(links=most.links, bytes=limit, depth=most.depth, exact=False)


def claimed_bounds(filesize: int) -> Bounds:
    """For a file nobody signed: what its own root claims, with room for other chunkers (≥ 1 KiB a block)."""
    return Bounds(links=64 + filesize // 1024, bytes=filesize)


@dataclass(frozen=True)
class Measured:
    size: int  # content bytes
    tsize: int  # block bytes with repeats: what a parent's link to this file says (Kubo's Tsize)


def _file_pieces(get_block: GetBlock, cid: str, bounds: Bounds | None,
                 name: str) -> Iterator[tuple[int, bytes]]:
    """(block length, content bytes) of every node of the file, in order; VerifyError past its bounds.

    Links are counted as they are pushed, not as they are visited: one 2 MiB block may hold 50 000 links,
    and a walk that let them pile up before counting would run out of memory before it said no.
    """
    label = name or cid
    stack = [(cid, 1)]
    visits = content = 0
    while stack:
        current, depth = stack.pop()
        block = get_block(current)
        if bounds is None:  # nobody signed a size: hold the file to what its own root claims
            bounds = claimed_bounds(_claimed_size(current, block))
        visits += 1
        links, data = _file_node(current, block, label)
        if links and depth >= bounds.depth:
            raise VerifyError(f"{label} nests deeper than the {bounds.depth} levels a {bounds.bytes}-byte "
                              "file has (a DAG bomb); refusing it")
        if visits + len(stack) + len(links) > bounds.links:
            raise VerifyError(f"{label} links more than the {bounds.links} blocks a {bounds.bytes}-byte file "
                              "has (a DAG bomb); refusing it")
        content += len(data)
        if content > bounds.bytes:
            raise VerifyError(f"{label} holds more than the {bounds.bytes} bytes promised for it; "
                              "refusing it")
        stack.extend((str(link.cid), depth + 1) for link in reversed(links))
        yield len(block), data
    if bounds is not None and bounds.exact and content != bounds.bytes:
        raise VerifyError(f"{label} holds {content} bytes, not the {bounds.bytes} promised for it; refusing "
                          "it")


def _claimed_size(cid: str, block: bytes) -> int:
    if CID.decode(cid).codec == RAW:
        return len(block)
    _, data = dagpb.decode_node(block)
    return decode_unixfs(data).filesize


def _file_node(cid: str, block: bytes, label: str) -> tuple[list[dagpb.Link], bytes]:
    """(links, content) of one node of a file: a raw leaf, or a dag-pb UnixFS File/Raw node."""
    parsed = CID.decode(cid)
    if parsed.codec == RAW:
        return [], block
    if parsed.codec != DAG_PB:
        raise CommonsError(f"unsupported codec 0x{parsed.codec:x} in {cid}: only dag-pb and raw are handled")
    links, data = dagpb.decode_node(block)
    node = decode_unixfs(data)
    if node.type not in (T_FILE, T_RAW):
        raise VerifyError(f"{label} is not a file (UnixFS type {node.type} at {cid}): use export for "
                          "directories")
    return links, node.data


def iter_file(get_block: GetBlock, cid: str, bounds: Bounds | None = None, name: str = "") -> Iterator[bytes]:
    """The file's bytes, in order, block by block; held to `bounds` (default: what its root claims)."""
    for _, data in _file_pieces(get_block, cid, bounds, name):
        if data:
            yield data


def measure_file(get_block: GetBlock, cid: str, bounds: Bounds, name: str = "") -> Measured:
    """Walks the whole file within `bounds` without keeping its bytes: its size and Tsize."""
    size = tsize = 0
    for block_len, data in _file_pieces(get_block, cid, bounds, name):
        size += len(data)
        tsize += block_len
    return Measured(size, tsize)


def _dir_links(get_block: GetBlock, cid: str) -> list[dagpb.Link] | None:
    """Links of a directory node, or None when cid is a file."""
    if CID.decode(cid).codec == RAW:
        return None
    links, data = dagpb.decode_node(get_block(cid))
    node = decode_unixfs(data)
    if node.type == T_HAMT:
        raise CommonsError(f"{cid} is a HAMT-sharded directory, which is not supported: split it")
    if node.type == T_SYMLINK:
        raise CommonsError(f"{cid} is a symlink, which is not supported: publish the target file")
    if node.type == T_DIRECTORY:
        for link in links:
            if (not link.name or link.name in (".", "..") or "/" in link.name or "\\" in link.name
                    or "\0" in link.name):
                raise VerifyError(f"directory {cid} has an unsafe entry name {link.name!r}: refusing to "
                                  "export it")
        return links
    return None


def walk_directory(get_block: GetBlock, cid: str, max_entries: int = MAX_ENTRIES
                   ) -> Iterator[tuple[str, str, list[dagpb.Link] | None]]:
    """(relative path, CID, links or None for a file) of every entry below a directory, in link order."""
    root_links = _dir_links(get_block, cid)
    if root_links is None:
        raise CommonsError(f"{cid} is a file, not a directory: use iter_file")
    stack = [("", link, 1) for link in reversed(root_links)]
    listed = len(stack)
    while stack:
        prefix, link, depth = stack.pop()
        child, path = str(link.cid), prefix + link.name
        sub = _dir_links(get_block, child)
        yield path, child, sub
        if sub is None:
            continue
        listed += len(sub)  # counted as pushed, so a directory repeated under itself stops here
        if listed > max_entries:
            raise VerifyError(f"directory {cid} lists more than {max_entries} entries; refusing it")
        if depth >= MAX_DEPTH:
            raise VerifyError(f"directory {cid} nests deeper than {MAX_DEPTH} levels; refusing it")
        stack.extend((path + "/", grandchild, depth + 1) for grandchild in reversed(sub))


def list_directory(get_block: GetBlock, cid: str) -> list[tuple[str, str, int]]:
    """Every file below a directory as (relative path, CID, size its root claims), in link order."""
    return [(path, child, _file_size(get_block, child))
            for path, child, sub in walk_directory(get_block, cid) if sub is None]


def _file_size(get_block: GetBlock, cid: str) -> int:
    return _claimed_size(cid, get_block(cid))


def export(get_block: GetBlock, cid: str, out_dir: Path) -> None:
    """Writes the file (at out_dir) or the directory tree (as out_dir), like `ipfs get -o out_dir`."""
    out_dir = Path(out_dir)
    if _dir_links(get_block, cid) is None:
        if out_dir.is_dir():
            raise CommonsError(f"{out_dir} is a directory but {cid} is a file: give a file path to write to")
        write_file(get_block, cid, out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, child, sub in walk_directory(get_block, cid):
        if sub is None:
            write_file(get_block, child, out_dir / path)
        else:
            (out_dir / path).mkdir(parents=True, exist_ok=True)


def write_file(get_block: GetBlock, cid: str, path: Path, bounds: Bounds | None = None,
               name: str = "") -> None:
    """The file's bytes at `path`, whole or not at all (a partial write never takes the name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("wb") as fh:
            for piece in iter_file(get_block, cid, bounds, name):
                fh.write(piece)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
