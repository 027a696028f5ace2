"""The addresses other machines can dial for a server bound to HOST, for the lines a user copies.

A server bound to 0.0.0.0 listens on every interface, but "0.0.0.0" and "HOST" are nothing a volunteer
can type: name this machine's own addresses instead, the one its default route uses first.
"""

from __future__ import annotations

import socket

ANY = ("0.0.0.0", "::", "[::]", "")


def listen_addresses(host: str) -> list[str]:
    """`host` itself, or for a bind-all host this machine's IPv4 addresses (loopback last)."""
    if host not in ANY:
        return [host]
    found = []
    try:  # the address of the default route: connecting a UDP socket sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            found.append(sock.getsockname()[0])
    except OSError:
        pass
    try:
        found += [str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    own = [a for a in dict.fromkeys(found) if not a.startswith("127.") and a != "0.0.0.0"]
    return [*own, "127.0.0.1"]
