"""Closed campaigns: only registered volunteers' SuperNodes may join (Flower SuperNode authentication).

    >>> tls, _ = ensure_tls(folder, tls_hosts("0.0.0.0"))  # CA + SuperLink certificate, reused on restart
    >>> args = superlink_args(tls)                         # flower-superlink ... --enable-supernode-auth
    >>> keys = read_volunteers(Path("volunteers.txt"))     # the admin's list of volunteers' public keys
    >>> register(flwr, flwr_home, key_file(folder, keys[0]), env)  # the coordinator admits one key

Flower authenticates SuperNodes with ECDSA keys (OpenSSH format) over TLS only; they are separate from
our ed25519 identity, which signs updates. An unregistered SuperNode is refused at connection time and
never receives a message; open campaigns skip all of this and rely on the robust aggregation rule.
The volunteer's side (its key, `flower-supernode`'s flags) is node/flower_keys.py. The CLI side
(`commons coordinator start --closed`, `admit`, `commons node key`, `--ca`) is in docs/closed.md.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import CommonsError
from protocol.signing.keys import fingerprint

NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what `flwr supernode register` accepts


@dataclass(frozen=True)
class TLS:
    ca: Path
    cert: Path
    key: Path


def _pem_private(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_bytes(data)


def _new_ca(days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lora-commons campaign CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _issue(ca, ca_key, hosts: tuple[str, ...], days: int):
    """A SuperLink certificate for `hosts`, signed by the campaign CA (never outliving it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    until = min(now + datetime.timedelta(days=days), ca.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA256()))
    return cert, key


def _write_tls(folder: Path, ca, ca_key, cert, key) -> TLS:
    from cryptography.hazmat.primitives import serialization

    folder.mkdir(parents=True, exist_ok=True)
    tls = TLS(folder / "ca.pem", folder / "superlink.pem", folder / "superlink.key")
    if ca_key is not None:  # kept beside the CA so a restart can re-issue the certificate for new names
        _write_secret(folder / "ca.key", _pem_private(ca_key))
        tls.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(tls.key, _pem_private(key))
    return tls


def make_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365) -> TLS:
    """A self-signed CA and a SuperLink certificate for `hosts` (volunteers get the CA file)."""
    ca, ca_key = _new_ca(days)
    return _write_tls(folder, ca, ca_key, *_issue(ca, ca_key, hosts, days))


def _cert_names(cert) -> set[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return ({str(n) for n in san.get_values_for_type(x509.IPAddress)}
            | set(san.get_values_for_type(x509.DNSName)))


def ensure_tls(folder: Path, hosts: tuple[str, ...], days: int = 365) -> tuple[TLS, str]:
    """The campaign's CA and SuperLink certificate: reused across restarts (volunteers keep their CA file);
    the certificate alone is re-issued when `hosts` grew or it nears expiry. Returns (tls, what was done)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
    tls = TLS(folder / "ca.pem", folder / "superlink.pem", folder / "superlink.key")
    try:
        ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
        ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    except (OSError, ValueError):
        return make_tls(folder, hosts, days), "created"
    if ca.not_valid_after_utc < soon:
        raise CommonsError(f"the campaign CA {tls.ca} expires on {ca.not_valid_after_utc:%Y-%m-%d}: move "
                           f"{folder} aside to create a new one, then send volunteers the new ca.pem")
    try:
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        fresh = tls.key.is_file() and cert.not_valid_after_utc > soon and set(hosts) <= _cert_names(cert)
    except (OSError, ValueError):
        fresh = False
    if fresh:
        return tls, "reused"
    return _write_tls(folder, ca, None, *_issue(ca, ca_key, hosts, days)), "reissued"


def tls_hosts(host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Names the certificate must carry: what volunteers dial, plus what this machine itself dials."""
    local = {"0.0.0.0": ("127.0.0.1",), "::": ("::1", "127.0.0.1")}.get(host, (host,))
    return tuple(dict.fromkeys([*extra, *local, "127.0.0.1", "localhost"]))


def parse_public_key(text: str, where: str) -> str:
    """One Flower SuperNode public key (OpenSSH, NIST EC curve) → its canonical line, comment dropped."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise CommonsError(f"{where} is not a Flower SuperNode public key (OpenSSH `ecdsa-sha2-nistp384 "
                           "AAAA...`): ask the volunteer for the line `commons node key` prints")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def parse_volunteers(text: str, source: str) -> list[str]:
    """A volunteers file: one public key per line; blank lines and `#` comments ignored; duplicates once."""
    keys: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys[parse_public_key(line, f"line {number} of {source}")] = None
    return list(keys)


def read_volunteers(path: Path) -> list[str]:
    """Keys from a volunteers file, or from every *.pub in a directory."""
    if path.is_dir():
        files = sorted(path.glob("*.pub"))
        if not files:
            raise CommonsError(f"no *.pub files in {path}: put one volunteer's `commons node key` line per "
                               "file")
        return list(dict.fromkeys(parse_public_key(f.read_text(errors="replace"), str(f)) for f in files))
    try:
        return parse_volunteers(path.read_text(errors="replace"), str(path))
    except FileNotFoundError:
        raise CommonsError(f"volunteers file {path} not found: pass --volunteers FILE (one public key per "
                           "line) or a directory of *.pub") from None


def key_file(folder: Path, key: str) -> Path:
    """Where a key is written for `flwr supernode register` (which reads files), named by fingerprint."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".pub")
    path.write_text(key + "\n")
    return path


def superlink_args(tls: TLS) -> list[str]:
    return ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
            "--enable-supernode-auth"]


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
        raise CommonsError(register_error(reply.get("error-message") or done.stderr or done.stdout,
                                          public_key.read_text(errors="replace").strip()))
    return int(reply["node-id"])


def register_error(detail: str, key: str) -> str:
    """Flower's multi-line reply → one line naming the fix."""
    lines = [x.strip() for x in detail.splitlines() if x.strip() and not x.startswith("Using SuperLink")]
    said = " ".join(lines)[-300:] or "no reply"
    try:
        who = fingerprint(key)
    except (IndexError, ValueError):
        who = "key"
    if "already in use" in said:
        return f"{who} is already registered with this coordinator: nothing to do"
    if "unavailable" in said.lower():
        return (f"could not register {who}: the coordinator's SuperLink does not answer ({said[:120]}); "
                "is it running?")
    return f"could not register {who}: {said}; is the SuperLink up with --enable-supernode-auth?"


def admitted(folder: Path) -> list[str]:
    """Keys `commons coordinator admit` saved (one per file)."""
    return [parse_public_key(f.read_text(errors="replace"), str(f)) for f in sorted(folder.glob("*.pub"))]
