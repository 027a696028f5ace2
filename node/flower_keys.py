"""A volunteer's Flower SuperNode key, for closed campaigns: made once, sent to the coordinator admin.

    >>> private, public = supernode_key(home())          # home/identity/flower_ecdsa(.pub), created once
    >>> args = supernode_args(ca, private)               # flower-supernode --root-certificates ... --auth-...

Flower authenticates SuperNodes with ECDSA keys (OpenSSH format) over TLS only; the key is separate from
our ed25519 identity, which signs updates. The coordinator's side (TLS, the admin's list of these public
keys, registering them) is coordinator/closed.py; the CLI side is in docs/closed.md.
"""

from __future__ import annotations

from pathlib import Path


def supernode_key(home: Path) -> tuple[Path, Path]:
    """(private, public) paths of this volunteer's Flower key, created once under home/identity."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = home / "identity" / "flower_ecdsa"
    public = home / "identity" / "flower_ecdsa.pub"
    if not private.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        private.parent.mkdir(parents=True, exist_ok=True)
        private.touch(mode=0o600, exist_ok=True)  # a secret: nobody else may read it, even for a moment
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH))
    return private, public


def supernode_args(ca: Path, private_key: Path | None) -> list[str]:
    """flower-supernode's TLS flags: trust the campaign's CA, and sign in with the key when there is one."""
    auth = ["--auth-supernode-private-key", str(private_key)] if private_key else []
    return ["--root-certificates", str(ca), *auth]
