"""Closed campaigns: only registered volunteers' SuperNodes may join (Flower SuperNode authentication).

    >>> tls = make_tls(folder)                                  # CA + SuperLink certificate (TLS is required)
    >>> args = superlink_args(tls)                              # flower-superlink ... --enable-supernode-auth
    >>> private, public = supernode_key(node_home)              # a volunteer's Flower key (once)
    >>> register(flwr_home, public)                             # the coordinator admits that key
    >>> node_args = supernode_args(tls.ca, private)             # flower-supernode ...

Flower authenticates SuperNodes with ECDSA keys (OpenSSH format) over TLS only; they are separate from
our ed25519 identity, which signs updates. An unregistered SuperNode is refused at connection time and
never receives a message; open campaigns skip all of this and rely on the robust aggregation rule.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import CommonsError


@dataclass(frozen=True)
class TLS:
    ca: Path
    cert: Path
    key: Path


def _pem_private(key, openssh: bool = False) -> bytes:
    from cryptography.hazmat.primitives import serialization

    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_bytes(data)


def make_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365) -> TLS:
    """A self-signed CA and a SuperLink certificate for `hosts` (volunteers get the CA file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=days)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lora-commons campaign CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    tls = TLS(folder / "ca.pem", folder / "superlink.pem", folder / "superlink.key")
    tls.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(tls.key, _pem_private(key))
    return tls


def supernode_key(home: Path) -> tuple[Path, Path]:
    """(private, public) paths of this volunteer's Flower key, created once under home/identity."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = home / "identity" / "flower_ecdsa", home / "identity" / "flower_ecdsa.pub"
    if not private.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        _write_secret(private, _pem_private(key, openssh=True))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH))
    return private, public


def superlink_args(tls: TLS) -> list[str]:
    return ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
            "--enable-supernode-auth"]


def supernode_args(ca: Path, private_key: Path) -> list[str]:
    return ["--root-certificates", str(ca), "--auth-supernode-private-key", str(private_key)]


def flwr_config(flwr_home: Path, address: str, ca: Path, name: str = "commons") -> Path:
    """The `flwr` CLI config that talks TLS to the SuperLink's Control API."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
                    f'root-certificates = "{ca}"\n')
    return path


def register(flwr: str, flwr_home: Path, public_key: Path, env: dict[str, str], name: str = "commons") -> int:
    """Admit one volunteer's SuperNode key; returns Flower's node id for it."""
    done = subprocess.run([flwr, "supernode", "register", str(public_key), name, "--format", "json"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**env, "FLWR_HOME": str(flwr_home)})
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {}
    if not reply.get("success"):
        detail = reply.get("error-message") or (done.stderr or done.stdout).strip()[-200:]
        raise CommonsError(f"could not register SuperNode key {public_key.name}: {detail}; is the SuperLink up "
                           "with --enable-supernode-auth?")
    return int(reply["node-id"])
