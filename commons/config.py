"""The user's config file, $COMMONS_HOME/config.toml; CLI flags override it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from protocol.errors import CommonsError
from protocol.home import home

DEFAULTS = {
    "index_url": "http://127.0.0.1:8765",
    "gateways": [],  # extra trustless gateways to pull blocks from
    "peers": [],  # libp2p multiaddrs of peers that seed blocks
    "node_limits": {},  # what this volunteer's node agrees to train (node/limits.py)
}

TEMPLATE = """# LoRA Commons configuration (flags on the command line override these)
# The index that resolves adapter names and serves blocks:
index_url = "{index_url}"
# More trustless gateways (http://host:port) to fetch blocks from:
gateways = []
# libp2p peers that seed blocks (/ip4/.../tcp/.../p2p/12D3...):
peers = []

# What your node agrees to train when you volunteer (defaults shown; raise them to allow more):
[node_limits]
# max_rank = 256
# max_steps = 10000
# max_batch = 512
# max_length = 16384
# max_datasets = 64
# allow_local_base = false   # true: a campaign may name a model folder on this machine
"""


def path() -> Path:
    return home() / "config.toml"


def load() -> dict:
    file = path()
    if not file.exists():
        return dict(DEFAULTS)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise CommonsError(f"{file} is not valid TOML ({exc}); "
                           "fix it or delete it and run `commons init`") from None
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise CommonsError(f"unknown setting {unknown[0]!r} in {file}; allowed: {', '.join(DEFAULTS)}")
    return {**DEFAULTS, **data}


def write_default() -> bool:
    file = path()
    if file.exists():
        return False
    file.write_text(TEMPLATE.format(**DEFAULTS), encoding="utf-8")
    return True
