#!/usr/bin/env python3
"""Container healthchecks: exit 0 when the service in this container is up, 1 (and one line why) if not.

    commons-healthcheck node         # the SuperNode that `commons node start` runs is alive
    commons-healthcheck coordinator  # the coordinator's gate (what volunteers dial) accepts connections
    commons-healthcheck index        # GET /api/stats answers 200

The coordinator and the index are checked on the host and port their own process was started with (read
from its command line), so `--port` or host networking needs no second setting; --port checks
127.0.0.1:PORT instead. Standard library only, so it costs nothing to start every 15-30 s and works
before the app imports.
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

# service -> (what its listening process's command line contains, the port it listens on by default)
SERVICES = {"coordinator": ("coordinator.gate", 9092), "index": ("index serve", 8765)}
ANY_ADDRESS = {"", "0.0.0.0", "::", "[::]"}


def processes(parent: int | None, proc: Path = Path("/proc")) -> list[str]:
    """Command lines of live, non-zombie processes (only children of `parent` if given), from /proc."""
    found = []
    for entry in proc.glob("[0-9]*"):
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # it exited while we looked
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        mine = parent is None or fields.get("PPid", "").strip() == str(parent)
        if mine and not fields.get("State", "").startswith("Z"):
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def node(parent: int | None) -> str | None:
    # `commons node start` keeps the SuperNode as its child: the CLI staying up is not health, the
    # SuperNode doing the work is. A container's PID namespace holds only its own processes, so any
    # SuperNode is ours; --parent narrows the search on a shared host (the tests).
    if any("flower-supernode" in cmd for cmd in processes(parent)):
        return None
    return "no flower-supernode process: the volunteer is not running"


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in a command line, the last one winning."""
    found = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(f"{name}="):
            found = arg.split("=", 1)[1]
    return found


def address(service: str) -> tuple[str, int] | None:
    """Where the service's own process listens, from its command line; None while no such process runs."""
    marker, default = SERVICES[service]
    for cmd in processes(None):
        if marker in cmd:
            argv = cmd.split()
            host = option(argv, "--host") or "127.0.0.1"
            port = option(argv, "--port")
            # a wildcard bind answers on loopback too; a specific address only on itself
            return ("127.0.0.1" if host in ANY_ADDRESS else host.strip("[]"), int(port) if port else default)
    return None


def coordinator(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"the coordinator's gate {host}:{port} is closed ({exc.strerror or exc})"
    return None


def index(host: str, port: int) -> str | None:
    url = f"http://{host}:{port}/api/stats"
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            reply.read()
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} failed: {getattr(exc, 'reason', exc)}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="commons-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=["node", "coordinator", "index"])
    parser.add_argument("--port", type=int, help="check 127.0.0.1:PORT (default: where the service listens)")
    parser.add_argument("--parent", type=int, help="node: only look at children of this pid")
    args = parser.parse_args(argv)
    if args.service == "node":
        problem = node(args.parent)
    else:
        check = coordinator if args.service == "coordinator" else index
        where = ("127.0.0.1", args.port) if args.port else address(args.service)
        problem = check(*where) if where else f"no {args.service} process is running"
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
