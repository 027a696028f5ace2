"""The volunteer's ClientApp runner: one long-lived process that runs only the installed node code.

Flower's SuperNode, started with `--isolation process`, keeps the coordinator's messages; it never
runs an app itself. This process asks the SuperNode's Runtime API (loopback, guarded by a secret only
this volunteer holds) for each task, reads the message and context, and answers with the installed
`node.client_app:app` of the installed lora-commons. The app bundle (FAB) the coordinator sent is only
read to check that it declares that component: its files are never unpacked, imported or put on
`sys.path`, so a coordinator can send data (the instruction, the adapter) but no code.

    SuperLink ──Fleet──▶ SuperNode (holds messages) ◀──Runtime API── runner (this file)
                                                                       └─ node.client_app.app (installed)

Because the process lives as long as `commons node start`, the base model stays loaded between rounds
and between campaigns on the same base (node/worker.py keeps it): no torch import or model load per
message. `commons node start` restarts the runner if it dies; the round resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import signal
import sys
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("commons.runner")

APP = "node.client_app:app"  # the one component a coordinator may ask for
POLL_SECONDS = 0.2  # how often an idle runner asks the SuperNode for work (a loopback call)
MAX_PYPROJECT = 64 * 1024  # a FAB's pyproject.toml is a few hundred bytes; larger is not ours
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


@dataclass(frozen=True)
class Bundle:
    """What a coordinator's app bundle declares, read without unpacking or importing it."""

    clientapp: str
    code_files: tuple[str, ...]


def read_bundle(fab: bytes) -> Bundle:
    """The declared ClientApp and the code files a FAB carries; raises ValueError for what is not a FAB."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        info = archive.getinfo("pyproject.toml")
        if info.file_size > MAX_PYPROJECT:
            raise ValueError(f"its pyproject.toml is {info.file_size} bytes")
        project = tomllib.loads(archive.read(info).decode("utf-8"))
        names = archive.namelist()
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"not a Flower app bundle ({exc})") from None
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    code = tuple(n for n in names if n.endswith((".py", ".pyc", ".so", ".pth")))
    return Bundle(clientapp=str(components.get("clientapp", "")), code_files=code)


def refusal(fab: bytes) -> str | None:
    """None when the bundle asks for our installed ClientApp, else the one-line reason it is refused."""
    try:
        bundle = read_bundle(fab)
    except ValueError as exc:
        return f"refused the coordinator's app: {exc}; this node runs only lora-commons' {APP}"
    if bundle.clientapp != APP:
        return (f"refused the coordinator's app: it declares ClientApp {bundle.clientapp!r}, and this node "
                f"runs only lora-commons' installed {APP}; campaigns are data, not code")
    return None


def load_app(ref: str):
    """The installed ClientApp object named MODULE:ATTR (imported from the environment, never a bundle)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


class Runner:
    """Serve one SuperNode's Runtime API; `app` is the installed ClientApp answering every message."""

    def __init__(self, runtime: str, secret: bytes, app, home: Path) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        self.runtime = runtime
        self.app = app
        self.home = home
        self.control = RuntimeHttpClient.from_server_address(
            server_address=runtime, insecure=True, root_certificates=None, retry_invoker=_no_retry(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={_ACQUIRE})],
        )

    def serve_forever(self) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        wait = POLL_SECONDS
        while True:
            try:
                res = self.control.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except httpx.HTTPError:  # the SuperNode is (re)starting: keep the model, wait for it
                time.sleep(wait)
                wait = min(5.0, wait * 2)
                continue
            wait = POLL_SECONDS
            if res.HasField("task") and res.token:
                self.run_task(res.token)
            else:
                time.sleep(POLL_SECONDS)

    def run_task(self, token: str) -> None:
        """One message in, one reply out, as Flower's own flwr-clientapp does, minus loading the bundle."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime, insecure=True, root_certificates=None, retry_invoker=_no_retry(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        sub_status, details = SubStatus.FAILED, "the node failed before reading the task"
        try:
            message, context, _run, fab = pull_task_input(client)
            log.info("%s message of run %s in", message.metadata.message_type, message.metadata.run_id)
            why = refusal(fab.content)
            if why:
                log.warning("%s", why)
                _status(self.home, state="refused", reason=why)
                reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=why), reply_to=message)
                details = why
            else:
                reply = self.app(message=message, context=context)
                sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # any failure becomes the coordinator's one-line error reply
            details = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            log.exception("task failed: %s", details)
            _status(self.home, state="failed", reason=details)
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                                reply_to=message)
        try:
            handed = time.monotonic()
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            log.info("reply handed to the SuperNode in %.2f s", time.monotonic() - handed)
        except Exception as exc:  # noqa: BLE001 - a lost reply is the round's timeout to handle, not a crash
            log.warning("could not send the reply: %s", exc)
        finally:
            heartbeat.stop()
            client.close()


def _no_retry():
    """Flower's default HTTP retry policy SIGINTs its own process on a 401; a long-lived runner must not."""
    from flwr.supercore.retry import RetryInvoker, exponential

    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=2),
                        recoverable_exceptions=(httpx.TransportError,),
                        max_tries=3, max_time=10)


def _status(home: Path, **fields) -> None:
    from node.settings import NodeSettings
    from node.worker import status

    status(NodeSettings(home=home, data=home), **fields)


def _exit_with_parent() -> None:
    """A daemon killed with -9 cannot stop its runner: the runner notices it was orphaned and stops."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.info("the volunteer's daemon is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _warm_up() -> None:
    """Import what training needs while the node waits for its first task: seconds of CPU a volunteer
    would otherwise add to its first round (its join time), and that a round closing on time can miss."""
    import threading

    def imports() -> None:
        started = time.monotonic()
        import peft  # noqa: F401 - imports torch and transformers too
        from transformers import AutoModelForCausalLM  # noqa: F401

        log.info("warm: torch, transformers and peft imported in %.1f s", time.monotonic() - started)

    threading.Thread(target=imports, daemon=True, name="warm-up").start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m node.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--secret-file", type=Path, required=True, help="the secret the SuperNode was given")
    parser.add_argument("--home", type=Path, required=True, help="this volunteer's COMMONS_HOME")
    args = parser.parse_args(argv)
    logs = args.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=logs / "node.log", level=logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _exit_with_parent()
    # the volunteer's own choice of implementation (tests use a deliberately malicious one);
    # never the bundle's
    app = load_app(os.environ.get("COMMONS_NODE_APP", APP))
    _warm_up()
    log.info("runner serving %s with %s", args.runtime_api_address, APP)
    Runner(args.runtime_api_address, args.secret_file.read_bytes(), app, args.home).serve_forever()


if __name__ == "__main__":
    main()
