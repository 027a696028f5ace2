"""Blocks on disk, one file per block, named by the sha256 digest (so CIDv0/v1 of one block share it).

Example:
    >>> store = BlockStore(tmp_path)
    >>> cid = store.add_path(Path("adapter/"))
    >>> store.export(cid, Path("copy/"))

Writes go to a temp file renamed into place, so a crash never leaves a half-written block under its
name; reads re-hash, so a block damaged on disk later is caught and dropped instead of served.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from protocol.content import unixfs
from protocol.content.multiformats import CID
from protocol.errors import CommonsError, VerifyError
from protocol.home import home


class BlockStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else home() / "blocks"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, cid: CID) -> Path:
        key = cid.digest.hex()
        return self.root / key[:2] / key

    def has(self, cid: str) -> bool:
        return self._path(CID.decode(cid)).exists()

    def put(self, cid: str, block: bytes) -> None:
        """Stores block under cid after checking that it hashes to it (VerifyError otherwise)."""
        parsed = CID.decode(cid)
        if hashlib.sha256(block).digest() != parsed.digest:
            raise VerifyError(f"block does not match its CID {cid}: discarded, fetch it from another source")
        self._write(parsed, block)

    def _write(self, cid: CID, block: bytes) -> None:
        path = self._path(cid)
        if path.exists():
            return
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(block)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, cid: str) -> bytes:
        parsed = CID.decode(cid)
        path = self._path(parsed)
        try:
            block = path.read_bytes()
        except FileNotFoundError:
            raise CommonsError(f"block {cid} is not in the store: "
                               f"fetch it first (commons pull {cid})") from None
        if hashlib.sha256(block).digest() != parsed.digest:
            path.unlink(missing_ok=True)
            raise VerifyError(f"block {cid} was corrupt on disk and has been removed: fetch it again")
        return block

    def add_path(self, path: Path, cid_version: int = 0, *, progress: unixfs.Progress | None = None) -> str:
        """Imports a file or directory as `ipfs add [-r]` does and stores every block;
        returns the root CID."""
        path = Path(path)

        def keep(cid: str, block: bytes) -> None:
            self._write(CID.decode(cid), block)  # the importer just hashed it

        if path.is_dir() and not path.is_symlink():
            return unixfs.import_directory(path, cid_version, keep, progress=progress)
        return unixfs.import_file(path, cid_version, keep, progress=progress)

    def export(self, cid: str, out_dir: Path) -> None:
        unixfs.export(self.get, cid, Path(out_dir))

    def dag(self, cid: str) -> Iterator[tuple[str, bytes]]:
        """Every block of the DAG once, depth-first pre-order in link order (as `ipfs dag export`)."""
        seen: set[bytes] = set()
        stack = [cid]
        while stack:
            current = stack.pop()
            key = CID.decode(current).to_bytes()
            if key in seen:
                continue
            seen.add(key)
            block = self.get(current)
            yield current, block
            stack.extend(reversed(unixfs.block_links(current, block)))

    def missing(self, cid: str) -> list[str]:
        """CIDs of the DAG not held yet; children of missing blocks cannot be known until they arrive."""
        out: list[str] = []
        seen: set[bytes] = set()
        stack = [cid]
        while stack:
            current = stack.pop()
            key = CID.decode(current).to_bytes()
            if key in seen:
                continue
            seen.add(key)
            if not self.has(current):
                out.append(current)
                continue
            stack.extend(reversed(unixfs.block_links(current, self.get(current))))
        return out
