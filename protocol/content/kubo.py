"""A small client for the Kubo RPC API (`ipfs daemon`, default http://127.0.0.1:5001), on httpx.

    >>> kubo = KuboClient("http://127.0.0.1:5001")
    >>> kubo.version()["Version"]
    '0.32.1'
    >>> kubo.add(Path("adapter.safetensors"))[-1]["Hash"]      # same CID `commons cid` prints
    >>> push_to_kubo("http://127.0.0.1:5001", BlockStore(), root)  # dag/import our CAR, then pin

Every RPC call is a POST to /api/v0/<command> with `arg=` query parameters (Kubo answers 405 to GET).
Errors are one line: no daemon, a timeout, or Kubo's own {"Message": ...} when it refuses.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Self

import httpx

from protocol.content.car import write_car
from protocol.content.multiformats import CID
from protocol.errors import CommonsError, VerifyError

DEFAULT_URL = "http://127.0.0.1:5001"
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# Adds and CAR uploads of multi-GB adapters stream for a long time; only a stall should fail them.
UPLOAD_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=600.0, pool=5.0)
CAR_SPOOL = 64 * 1024 * 1024


class KuboClient:
    def __init__(self, url: str = DEFAULT_URL, timeout: httpx.Timeout | float = TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=f"{self.url}/api/v0/", timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing
    def _post(self, command: str, params: dict | None = None, files: dict | None = None,
              timeout: httpx.Timeout | None = None) -> httpx.Response:
        try:
            response = self.http.post(command, params=_params(params), files=files,
                                      timeout=timeout or self.http.timeout)
        except httpx.ConnectError:
            raise CommonsError(f"no Kubo daemon at {self.url}: "
                               "start `ipfs daemon` or pass --kubo URL") from None
        except httpx.TimeoutException:
            raise CommonsError(
                f"Kubo at {self.url} did not answer {command} in time: check the daemon (ipfs diag sys)"
            ) from None
        except httpx.HTTPError as exc:
            raise CommonsError(f"talking to Kubo at {self.url} failed ({exc}): check the URL") from None
        if response.status_code != 200:
            raise CommonsError(_refusal(self.url, command, response))
        return response

    def _json(self, command: str, params: dict | None = None, **kw) -> dict:
        response = self._post(command, params, **kw)
        try:
            return response.json()
        except ValueError:
            raise CommonsError(f"{self.url} answered {command} with non-JSON: "
                               "is it really Kubo's RPC port?") from None

    def _json_lines(self, command: str, params: dict | None = None, **kw) -> list[dict]:
        response = self._post(command, params, **kw)
        try:
            return [json.loads(line) for line in response.text.splitlines() if line.strip()]
        except ValueError:
            raise CommonsError(f"{self.url} answered {command} with non-JSON: "
                               "is it really Kubo's RPC port?") from None

    # -- commands
    def version(self) -> dict:
        return self._json("version")

    def add(self, src: Path | bytes, cid_version: int = 0, raw_leaves: bool | None = None,
            chunker: str = "size-262144", pin: bool = True, name: str | None = None) -> list[dict]:
        """`ipfs add` of one file, streamed; JSON lines [{Name, Hash, Size}], the root last."""
        params = {"cid-version": cid_version, "chunker": chunker, "pin": pin, "raw-leaves": raw_leaves}
        if isinstance(src, (bytes, bytearray)):
            files = {"file": (name or "file", bytes(src), "application/octet-stream")}
            return self._json_lines("add", params, files=files, timeout=UPLOAD_TIMEOUT)
        path = Path(src)
        if not path.is_file():
            raise CommonsError(f"{path} is not a file: add folders with `commons publish` (CAR upload)")
        with path.open("rb") as fh:  # httpx streams file objects in chunks
            files = {"file": (name or path.name, fh, "application/octet-stream")}
            return self._json_lines("add", params, files=files, timeout=UPLOAD_TIMEOUT)

    def cat(self, cid: str) -> bytes:
        return self._post("cat", {"arg": cid}).content

    def pin_add(self, cid: str) -> list[str]:
        return self._json("pin/add", {"arg": cid}, timeout=UPLOAD_TIMEOUT).get("Pins", [])

    def dag_import(self, car: BinaryIO | bytes, pin_roots: bool = True) -> list[str]:
        """Uploads a CAR; returns the root CIDs Kubo imported."""
        files = {"file": ("dag.car", car, "application/vnd.ipld.car")}
        lines = self._json_lines("dag/import", {"pin-roots": pin_roots}, files=files, timeout=UPLOAD_TIMEOUT)
        roots = [line["Root"]["Cid"]["/"] for line in lines if "Root" in line]
        errors = [line["Root"].get("PinErrorMsg") for line in lines if "Root" in line]
        if any(errors):
            raise CommonsError(f"Kubo imported the CAR but could not pin it: {next(e for e in errors if e)}")
        return roots

    def dag_export(self, cid: str) -> Iterator[bytes]:
        """The CAR of cid's DAG, as Kubo streams it."""
        try:
            with self.http.stream("POST", "dag/export", params={"arg": cid},
                                  timeout=UPLOAD_TIMEOUT) as response:
                if response.status_code != 200:
                    response.read()
                    raise CommonsError(_refusal(self.url, "dag/export", response))
                yield from response.iter_bytes()
        except httpx.ConnectError:
            raise CommonsError(f"no Kubo daemon at {self.url}: "
                               "start `ipfs daemon` or pass --kubo URL") from None

    def routing_provide(self, cid: str, recursive: bool = True) -> None:
        """Announce to the DHT that this Kubo holds cid (and, recursive, its whole DAG)."""
        self._post("routing/provide", {"arg": cid, "recursive": recursive}, timeout=UPLOAD_TIMEOUT)


def _params(params: dict | None) -> dict:
    # Kubo wants lower-case booleans and no key at all for "use the default".
    return {k: (str(v).lower() if isinstance(v, bool) else v)
            for k, v in (params or {}).items() if v is not None}


def _refusal(url: str, command: str, response: httpx.Response) -> str:
    if response.status_code == 405:
        return f"{url} refused {command} with 405: Kubo's RPC needs POST; is the URL the RPC port (5001)?"
    if response.status_code == 404:
        return f"{url} has no /api/v0/{command}: is the URL Kubo's RPC port (5001), not the gateway?"
    try:
        message = response.json().get("Message") or response.text
    except ValueError:
        message = response.text
    message = " ".join(str(message).split())[:300] or f"HTTP {response.status_code}"
    return f"Kubo refused {command}: {message}"


def push_to_kubo(kubo_url: str, store, root_cid: str, provide: bool = False) -> str:
    """dag/import our CAR of root_cid into Kubo, pin it, optionally announce it; returns the root.

    The CAR is spooled to disk above 64 MiB, so multi-GB adapters do not sit in memory.
    """
    root = str(CID.decode(root_cid))
    with KuboClient(kubo_url) as kubo, tempfile.SpooledTemporaryFile(max_size=CAR_SPOOL) as car:
        write_car(car, [root], store.dag(root))
        car.seek(0)
        roots = kubo.dag_import(car, pin_roots=False)  # pin only once the root checks out
        if not any(CID.decode(r).to_v1() == CID.decode(root).to_v1() for r in roots):
            raise VerifyError(f"Kubo imported root {roots} but we published {root}: refusing to pin")
        kubo.pin_add(root)
        if provide:
            kubo.routing_provide(root)
    return root
