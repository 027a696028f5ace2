"""Hosts on a private LAN made of Linux network namespaces, for multi-machine tests without Docker.

Each host is a namespace with one interface `eth0` and its own 10.x address; a switch namespace holds the
bridge every host's veth pair plugs into, so nothing is added to the machine's own network. `Lan.close()`
kills every process still inside the namespaces (`ip netns pids`) and deletes them, which also destroys
the veth pairs and the bridge.

    with lan(["coordinator", "volunteer"]) as net:
        proc = net.popen("coordinator", ["commons", "index", "serve", "--host", net.ip("coordinator")])
        net.cut("volunteer")      # unplug the cable: its link goes down mid-whatever

A host can sit behind a NAT instead of on the bridge: `lan(["relay", "router"], nat={"home": "router"})` puts
`home` on a private 192.168.x.0/24 whose only way out is `router`, which masquerades it behind its LAN
address and drops every connection that `home` did not open (a home router, no port forwarding).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=15)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (the skip reason), or None when they can."""
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`): apt-get install -y iproute2"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run as root or in a privileged container)"
    probe = f"cmh-probe-{os.getpid()}"
    result = ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here ({result.stderr.strip()}): needs CAP_SYS_ADMIN"
    bridge = ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
    ip("netns", "del", probe, check=False)
    if bridge.returncode != 0:
        return (f"cannot create a bridge in a namespace ({bridge.stderr.strip()}): "
                "needs the bridge kernel module")
    return None


@dataclass
class Lan:
    """Namespaced hosts on one bridge; `names` map to addresses `subnet.(2+i)`."""

    tag: str
    subnet: str
    names: list[str]
    nat: dict[str, str] = field(default_factory=dict)  # host behind a NAT -> its router (one of `names`)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"cmh-{self.tag}-sw"

    def ns(self, name: str) -> str:
        if name in self.nat:
            return f"cmh-{self.tag}-n{list(self.nat).index(name)}"
        return f"cmh-{self.tag}-{self.names.index(name)}"

    def ip(self, name: str) -> str:
        """The host's own address: for a host behind a NAT, its private one (unreachable from the LAN)."""
        if name in self.nat:
            return f"{self.private_subnet(name)}.2"
        return f"{self.subnet}.{2 + self.names.index(name)}"

    def private_subnet(self, name: str) -> str:
        return f"192.168.{1 + list(self.nat).index(name)}"

    def namespaces(self) -> list[str]:
        return [self.switch, *(self.ns(n) for n in [*self.names, *self.nat])]

    def up(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ns, host_end, switch_end = self.ns(name), f"cmh{self.tag}h{i}", f"cmh{self.tag}s{i}"
            ip("netns", "add", ns)
            ip("link", "add", host_end, "type", "veth", "peer", "name", switch_end)
            ip("link", "set", host_end, "netns", ns)
            ip("link", "set", switch_end, "netns", self.switch)
            ip("-n", ns, "link", "set", host_end, "name", "eth0")
            ip("-n", ns, "addr", "add", f"{self.ip(name)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", self.switch, "link", "set", switch_end, "master", "br0")
            ip("-n", self.switch, "link", "set", switch_end, "up")
        for i, (home, router) in enumerate(self.nat.items()):
            self._behind_nat(i, home, router)

    def _behind_nat(self, i: int, home: str, router: str) -> None:
        ns, gateway = self.ns(home), self.ns(router)
        home_end, router_end, inside = f"cmh{self.tag}n{i}", f"cmh{self.tag}r{i}", f"home{i}"
        ip("netns", "add", ns)
        ip("link", "add", home_end, "type", "veth", "peer", "name", router_end)
        ip("link", "set", home_end, "netns", ns)
        ip("link", "set", router_end, "netns", gateway)
        ip("-n", ns, "link", "set", home_end, "name", "eth0")
        ip("-n", gateway, "link", "set", router_end, "name", inside)
        ip("-n", ns, "addr", "add", f"{self.ip(home)}/24", "dev", "eth0")
        ip("-n", gateway, "addr", "add", f"{self.private_subnet(home)}.1/24", "dev", inside)
        for where, dev in ((ns, "eth0"), (ns, "lo"), (gateway, inside)):
            ip("-n", where, "link", "set", dev, "up")
        ip("-n", ns, "route", "add", "default", "via", f"{self.private_subnet(home)}.1")
        nat_rules = [
            ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
            ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"],
            # no port forwarding: from the LAN, only replies to what `home` opened get in
            ["iptables", "-A", "FORWARD", "-i", "eth0", "-o", inside, "-m", "conntrack", "!",
             "--ctstate", "ESTABLISHED,RELATED", "-j", "DROP"],
        ]
        for rule in nat_rules:
            done = self.run(router, rule, capture_output=True, text=True, timeout=15)
            if done.returncode != 0:
                raise RuntimeError(f"cannot set up the NAT on {router} ({' '.join(rule)}: "
                                   f"{done.stderr.strip()}): needs iptables with the nat table")

    def route_via(self, name: str, behind: str) -> None:
        """Give LAN host `name` a route to `behind`'s private subnet through its router, so that a failed
        dial there proves the NAT refuses it, not merely that no route exists."""
        gateway = self.ip(self.nat[behind])
        ip("-n", self.ns(name), "route", "add", f"{self.private_subnet(behind)}.0/24", "via", gateway)

    def run(self, name: str, args: Sequence[str], check: bool = False,
            **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns(name), *args], check=check, **kwargs)

    def popen(self, name: str, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """A process on host `name`, in its own session so `close()` can interrupt its whole tree."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(name), *args], start_new_session=True,
                                **kwargs)
        self.procs.append(proc)
        return proc

    def cut(self, name: str) -> None:
        """Unplug host `name`: its interface goes down, so in-flight connections hang and new ones fail."""
        ip("-n", self.ns(name), "link", "set", "eth0", "down")

    def reachable(self, src: str, dst: str, port: int, timeout: float = 2.0) -> bool:
        probe = (f"import socket; socket.create_connection(({self.ip(dst)!r}, {port}), "
                 f"timeout={timeout}).close()")
        done = self.run(src, [sys.executable, "-c", probe], capture_output=True, timeout=timeout + 10,
                        check=False)
        return done.returncode == 0

    def close(self) -> None:
        # SIGINT first: our CLIs stop the Flower processes they started on KeyboardInterrupt
        for proc in self.procs:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
        # whatever is left inside our namespaces was started by this test (Flower's grandchildren included)
        for ns in self.namespaces():
            listed = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in listed:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.namespaces()):
            ip("netns", "del", ns, check=False)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def lan(names: Sequence[str], nat: dict[str, str] | None = None) -> Iterator[Lan]:
    """A fresh LAN of `names` hosts, and `nat` hosts each behind its router; everything it made is removed
    on exit, failures included."""
    tag = f"{os.getpid() % 10000:04d}"
    net = Lan(tag=tag, subnet=f"10.{180 + os.getpid() % 60}.{os.getpid() % 250}", names=list(names),
              nat=dict(nat or {}))
    try:
        net.up()
        yield net
    finally:
        net.close()
