"""A client for the IPFS Pinning Service API (https://ipfs.github.io/pinning-services-api-spec/).

    >>> svc = PinningClient("https://api.pinata.cloud/psa", token=os.environ["COMMONS_PINNING_TOKEN"])
    >>> status = svc.add(root, name="math-lora@3", origins=node.addrs)
    >>> svc.wait(status.requestid).status
    'pinned'

`/pins` POST (ask), GET (list / one), DELETE (remove), with a Bearer token. A pin moves
queued → pinning → pinned | failed; `wait` polls until it settles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

import httpx

from protocol.errors import CommonsError

TIMEOUT = httpx.Timeout(30.0, connect=5.0)


@dataclass(frozen=True)
class PinStatus:
    requestid: str
    status: str  # queued | pinning | pinned | failed
    cid: str
    name: str | None = None
    created: str = ""
    delegates: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @staticmethod
    def from_json(data: dict) -> PinStatus:
        try:
            pin = data["pin"]
            return PinStatus(data["requestid"], data["status"], pin["cid"], pin.get("name"),
                             data.get("created", ""), list(data.get("delegates") or []),
                             dict(data.get("info") or {}))
        except (KeyError, TypeError):
            raise CommonsError("the pinning service answered without requestid/status/pin: is the URL its "
                               "API root (…/psa or similar)?") from None


class PinningClient:
    def __init__(self, endpoint: str, token: str, timeout: httpx.Timeout | float = TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not token:
            raise CommonsError("no pinning service token: pass --pinning-token or set COMMONS_PINNING_TOKEN")
        self.endpoint = endpoint.rstrip("/")
        self.http = httpx.Client(base_url=self.endpoint, timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, what: str, **kw) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.ConnectError:
            raise CommonsError(f"no pinning service at {self.endpoint}: check the endpoint URL") from None
        except httpx.TimeoutException:
            raise CommonsError(f"pinning service at {self.endpoint} did not answer ({what}): "
                               "try again later") from None
        except httpx.HTTPError as exc:
            raise CommonsError(f"talking to the pinning service at {self.endpoint} failed ({exc})") from None
        if response.status_code in (401, 403):
            raise CommonsError(f"pinning service refused the token ({response.status_code} "
                               f"{_reason(response)}): check --pinning-token / COMMONS_PINNING_TOKEN")
        if response.status_code >= 400:
            raise CommonsError(f"pinning service refused {what} (HTTP {response.status_code}: "
                               f"{_reason(response)})")
        return response

    def add(self, cid: str, name: str | None = None, origins: Sequence[str] = (),
            meta: dict | None = None) -> PinStatus:
        """Ask the service to pin cid; `origins` are multiaddrs of peers that hold it (ours)."""
        body: dict = {"cid": cid}
        if name:
            body["name"] = name
        if origins:
            body["origins"] = list(origins)
        if meta:
            body["meta"] = {k: str(v) for k, v in meta.items()}
        return PinStatus.from_json(self._call("POST", "/pins", f"pin {cid}", json=body).json())

    def get(self, requestid: str) -> PinStatus:
        return PinStatus.from_json(self._call("GET", f"/pins/{requestid}", f"status of {requestid}").json())

    def list(self, cid: str | None = None, name: str | None = None, status: Sequence[str] = (),
             limit: int = 10) -> list[PinStatus]:
        params: dict = {"limit": limit}
        if cid:
            params["cid"] = cid
        if name:
            params["name"] = name
        if status:
            params["status"] = ",".join(status)
        data = self._call("GET", "/pins", "list", params=params).json()
        return [PinStatus.from_json(item) for item in data.get("results", [])]

    def remove(self, requestid: str) -> None:
        self._call("DELETE", f"/pins/{requestid}", f"remove {requestid}")

    def wait(self, requestid: str, timeout: float = 600.0, interval: float = 2.0,
             sleep: Callable[[float], None] = time.sleep) -> PinStatus:
        """Polls until pinned (returned) or failed / timed out (CommonsError)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.get(requestid)
            if status.status == "pinned":
                return status
            if status.status == "failed":
                detail = status.info.get("status_details") or "no details given"
                raise CommonsError(f"pinning service failed to pin {status.cid} ({detail}): check a provider "
                                   f"is online (commons p2p serve) and pass its address as an origin")
            if time.monotonic() + interval > deadline:
                raise CommonsError(f"{status.cid} still {status.status} after {timeout:.0f}s: check later "
                                   f"with request id {requestid}")
            sleep(interval)


def _reason(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        text = f"{error.get('reason', '')}: {error.get('details', '')}".strip(": ")
    except (ValueError, KeyError, TypeError, AttributeError):
        text = response.text
    return " ".join(text.split())[:300] or response.reason_phrase
