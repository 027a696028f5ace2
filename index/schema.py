"""Tables of the index and the mapping between a verified manifest and its rows.

`entries` is kept narrow (what lists, filters and sorts touch) and `documents` holds the bulky signed
envelope and manifest, so scanning or sorting thousands of entries never drags kilobytes per row.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import TSVECTOR

metadata = MetaData()
entries = Table(
    "entries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # FTS5 rows share this id (stable on VACUUM)
    Column("cid", String(128), nullable=False, unique=True),
    Column("name", String(200), nullable=False, index=True),
    Column("version", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("base_model", String(200), nullable=False, default="", index=True),
    Column("license", String(100), nullable=False, default="", index=True),
    Column("task", String(200), nullable=False, default="", index=True),
    Column("campaign", String(200), nullable=False, default=""),
    Column("description", String(500), nullable=False, default=""),
    Column("signer", String(64), nullable=False),
    Column("trusted", Boolean, nullable=False, default=False),
    Column("size", BigInteger, nullable=False, default=0),
    Column("rounds", Integer, nullable=False, default=0),
    Column("tokens", BigInteger, nullable=False, default=0),
    Column("created", String(40), nullable=False, default=""),
    Column("registered_at", Float, nullable=False),
    Column("latest", Boolean, nullable=False, default=True),
    Column("search_text", Text, nullable=False, default=""),
    # PostgreSQL keeps the parsed words (GIN-indexed); SQLite leaves this empty and uses FTS5 instead.
    Column("search_tsv", Text().with_variant(TSVECTOR(), "postgresql"), nullable=True),
    UniqueConstraint("name", "version", name="uq_name_version"),
    Index("ix_entries_recent", "latest", "kind", "registered_at"),
)
documents = Table(
    "documents", metadata,
    Column("cid", String(128), primary_key=True),
    Column("envelope", LargeBinary, nullable=False),
    Column("meta_json", Text, nullable=False),
    Column("files_json", Text, nullable=False),
)
ledger = Table(
    "ledger", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("cid", String(128), nullable=False, index=True),
    Column("node", String(64), nullable=False, index=True),
    Column("rounds", Integer, nullable=False, default=0),
    Column("tokens", BigInteger, nullable=False, default=0),
)
contributors = Table(
    "contributors", metadata,
    Column("cid", String(128), primary_key=True),
    Column("node", String(64), primary_key=True),
)
# Who owns a name, compared folded (case, and runs of '-', '_', '.'),
# so `My.Model` cannot be taken from `my-model`.
names = Table(
    "names", metadata,
    Column("folded", String(200), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("signer", String(64), nullable=False),
)
# Announcements whose DAG the index does not hold yet: they bind nothing until it does and checks out.
pending = Table(
    "pending", metadata,
    Column("cid", String(128), primary_key=True),
    Column("digest", String(64), primary_key=True),  # sha256 of the envelope
    Column("name", String(200), nullable=False, index=True),
    Column("envelope", LargeBinary, nullable=False),
    Column("received_at", Float, nullable=False),
)
presence = Table(
    "presence", metadata,
    Column("node", String(64), primary_key=True),
    Column("seen_at", Float, nullable=False),
)
# SQLite only, created by hand (FTS5 is a virtual table); holds the latest version of each name.
FTS_DDL = ("CREATE VIRTUAL TABLE IF NOT EXISTS entries_fts USING fts5("
           "body, tokenize='unicode61 remove_diacritics 2', prefix='2 3 4')")
PG_DDL = "CREATE INDEX IF NOT EXISTS entries_tsv ON entries USING gin (search_tsv)"
SUMMARY_FIELDS = ("cid", "name", "version", "kind", "base_model", "license", "task", "campaign",
                  "description", "signer", "trusted", "size", "rounds", "tokens", "created")


def fold(name: str) -> str:
    """The form two names are compared in: `My.Model`, `my_model` and `my--model` are one name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def search_body(meta: Any, task: str, description: str) -> str:
    """The words full-text search sees; punctuation split off so "org/model-id" yields org, model, id."""
    datasets = " ".join(f"{d.get('name', '')} {d.get('license', '')}" for d in meta.datasets or [])
    fields = (meta.name, meta.kind, meta.base_model, task, meta.campaign, meta.license, description, datasets)
    return " ".join(word for f in fields for word in re.findall(r"\w+", str(f)))


def rows_for(verified: Any, envelope: bytes, cid: str, latest: bool, trusted_keys: frozenset[str]
             ) -> tuple[dict, dict]:
    """(entries row, documents row) of a verified manifest."""
    meta = verified.meta
    ev = meta.eval if isinstance(meta.eval, dict) else {}
    description = str(ev.get("description") or "")[:500]
    task = str(ev.get("task") or meta.campaign or "")[:200]
    entry = {
        "cid": cid, "name": meta.name, "version": int(meta.version), "kind": meta.kind,
        "base_model": meta.base_model[:200], "license": meta.license[:100], "task": task,
        "campaign": meta.campaign[:200], "description": description, "signer": verified.signer,
        "trusted": verified.signer in trusted_keys,
        "size": sum(int(f.get("size", 0) or 0) for f in verified.files),
        "rounds": int(meta.rounds or 0),
        "tokens": sum(nonneg(i.get("tokens")) for i in meta.ledger or []),
        "created": meta.created or "", "registered_at": time.time(), "latest": latest,
        "search_text": search_body(meta, task, description),
    }
    document = {
        "cid": cid, "envelope": bytes(envelope),
        "meta_json": json.dumps(meta.to_dict(), sort_keys=True, default=str),
        "files_json": json.dumps(list(verified.files), sort_keys=True, default=str),
    }
    return entry, document


def to_entry(row: Any, meta_json: str, files_json: str | None = None) -> dict:
    out = {k: row[k] for k in SUMMARY_FIELDS}
    out["trusted"] = bool(out["trusted"])
    out["meta"] = json.loads(meta_json)
    if files_json is not None:
        out["files"] = json.loads(files_json)
    return out


def nonneg(value: object) -> int:
    """A ledger number as an int; a signed manifest may still carry junk there, which counts as 0."""
    try:
        return max(0, int(value))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def same_envelope(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return a == b
