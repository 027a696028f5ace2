"""Run a trio peer on its own thread, so asyncio (uvicorn) or blocking code (the node daemon) keeps its own.

    >>> peer = Background(lambda ready: serve(store, listen=addrs, on_ready=ready))
    >>> info = peer.start()          # waits until the peer calls ready(info); re-raises its startup error
    >>> block = peer.call(swap.get, cid, peers)   # an async function run on the peer's thread
    >>> peer.stop()                  # cancels the trio run and joins the thread

`run(ready)` is an async function that calls `ready(value)` once it listens; `start()` returns that value.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from protocol.errors import CommonsError

READY_TIMEOUT_S = 30.0


class Background:
    def __init__(self, run: Callable[[Callable[[Any], None]], Awaitable[None]], name: str = "p2p") -> None:
        self._run = run
        self._ready = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self, timeout: float = READY_TIMEOUT_S) -> Any:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise CommonsError(f"the libp2p host did not start in {timeout:.0f}s; check the listen address")
        if self._error is not None:
            raise self._error
        return self._value

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """`await fn(*args)` on the peer's trio thread, from any other thread (several at once)."""
        if self._token is None or not self.alive:
            raise CommonsError("the libp2p host is not running: start() it first")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise CommonsError("the libp2p host stopped; start a new one") from None

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)

    def _set_ready(self, value: Any) -> None:
        self._value = value
        self._ready.set()

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                await self._run(self._set_ready)

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - handed to start(), or reported: a thread dies silently
            from protocol.p2p.exchange import unwrap

            error = unwrap(exc) if isinstance(exc, BaseExceptionGroup) else exc
            if self._ready.is_set():
                print(f"warning: the libp2p host stopped: {error}", file=sys.stderr)
            self._error = error
        finally:
            self._ready.set()
