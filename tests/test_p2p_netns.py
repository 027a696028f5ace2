"""Two hosts in two network namespaces joined by a veth pair: publish on A, pull on B over 10.x addresses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.content.blockstore import BlockStore

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[1]
TAG = f"{os.getpid() % 10000}"
NS_A, NS_B = f"cmns-a-{TAG}", f"cmns-b-{TAG}"
VETH_A, VETH_B = f"cva{TAG}", f"cvb{TAG}"
SUBNET = f"10.{77 + os.getpid() % 100}.{os.getpid() % 250}"
ADDR_A, ADDR_B = f"{SUBNET}.1", f"{SUBNET}.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`): apt-get install -y iproute2"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run as root or in a privileged container)"
    probe = f"cmns-probe-{TAG}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here ({result.stderr.strip()}): needs CAP_SYS_ADMIN"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


@pytest.fixture
def namespaces():
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        _ip("netns", "add", NS_A)
        _ip("netns", "add", NS_B)
        _ip("link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B)
        _ip("link", "set", VETH_A, "netns", NS_A)
        _ip("link", "set", VETH_B, "netns", NS_B)
        for ns, dev, addr in ((NS_A, VETH_A, ADDR_A), (NS_B, VETH_B, ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for ns in (NS_A, NS_B):  # deleting a namespace destroys its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_publish_in_one_namespace_pull_in_another(tmp_path, namespaces):
    payload = tmp_path / "adapter.bin"
    payload.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    env = {**os.environ, "COMMONS_HOME": str(tmp_path / "home")}
    seeder = subprocess.Popen(
        ["ip", "netns", "exec", NS_A, sys.executable, "-m", "protocol.p2p", "serve", "--store",
         str(tmp_path / "a"), "--add", str(payload), "--listen", f"/ip4/{ADDR_A}/tcp/4051"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        line = seeder.stdout.readline().decode()
        assert line, seeder.stderr.read().decode()[-2000:]
        info = json.loads(line)
        addr = next(a for a in info["addrs"] if a.startswith(f"/ip4/{ADDR_A}/"))
        pull = subprocess.run(
            ["ip", "netns", "exec", NS_B, sys.executable, "-m", "protocol.p2p", "pull", info["roots"][0],
             "--store", str(tmp_path / "b"), "--peer", addr, "--out", str(tmp_path / "out.bin"),
             "--no-progress"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert pull.returncode == 0, pull.stderr[-2000:]
        report = json.loads(pull.stdout)
        assert report["root"] == BlockStore(tmp_path / "ref").add_path(payload)
        assert (tmp_path / "out.bin").read_bytes() == payload.read_bytes()

        # B has no route to anything but A's subnet: a loopback address of A is unreachable from B.
        wrong = addr.replace(ADDR_A, "127.0.0.1")
        failed = subprocess.run(
            ["ip", "netns", "exec", NS_B, sys.executable, "-m", "protocol.p2p", "pull", info["roots"][0],
             "--store", str(tmp_path / "c"), "--peer", wrong, "--no-progress"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert failed.returncode == 1 and failed.stderr.startswith("error: no peer reachable")
        assert failed.stderr.count("\n") == 1
    finally:
        seeder.send_signal(signal.SIGKILL)
        seeder.wait(10)
