"""The index database: every signed adapter and dataset version, immutable by CID, searchable.

    >>> db = IndexDB()                                   # sqlite:///$COMMONS_HOME/index.db
    >>> db.register(Path("adapter/model.sig").read_bytes(), "Qm...")
    >>> db.search("math", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> db.resolve("smollm2-math")["cid"]

SQLAlchemy Core with bound parameters only. Full-text search is FTS5 on SQLite and a `simple` tsvector
(GIN-indexed) on PostgreSQL; both get the same sanitized prefix query, so user input never reaches SQL.
The index is a registry of names: the first signer of a name owns it (and every name that folds to the
same, see `schema.fold`), and a (name, version) or a CID, once registered, never changes. Announcements
whose DAG the index does not hold wait in `pending`, binding nothing (see `index.admit`).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import create_engine, delete, event, func, literal_column, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from index.schema import (
    FTS_DDL,
    PG_DDL,
    SUMMARY_FIELDS,
    contributors,
    documents,
    entries,
    fold,
    ledger,
    metadata,
    names,
    nonneg,
    pending,
    presence,
    rows_for,
    same_envelope,
    to_entry,
)
from protocol.content.multiformats import CID
from protocol.errors import CommonsError, VerifyError
from protocol.home import home
from protocol.signing.manifest import verify_envelope
from protocol.signing.trust import TrustPolicy

__all__ = ["ConflictError", "IndexDB", "default_url", "fts_terms", "metadata"]
LIVE_SECONDS = 300  # a node that announced presence this recently counts as live
MAX_LIMIT = 500
MAX_PENDING = 2000  # announcements held at most; the oldest go first (their publisher announces again)
MAX_PENDING_ENVELOPE = 256 << 10  # so the table stays under 512 MiB however it is flooded
PENDING_SECONDS = 7 * 86400
SUMMARY_COLUMNS = [entries.c[name] for name in SUMMARY_FIELDS]


class ConflictError(VerifyError):
    """The name, version or CID is already taken by something else (a squat or a replay)."""


def default_url() -> str:
    return f"sqlite:///{home() / 'index.db'}"


def root_cid(cid: str) -> str:
    """The CID in its normal form, or a one-line CommonsError."""
    try:
        return str(CID.decode(cid))
    except Exception:  # noqa: BLE001 - any decoding failure is the user's malformed CID
        raise CommonsError(f"{str(cid)[:80]!r} is not a CID; pass the Qm.../b... root CID of the "
                           "signed directory") from None


def fts_terms(q: str) -> list[str]:
    """Words of a user query, reduced to characters no FTS syntax can see."""
    return re.findall(r"\w+", q.lower())[:12]


class IndexDB:
    """One database of signed entries.

    `policy` is the TrustPolicy envelopes are checked under (default: in memory, any valid signer, the
    database itself pins each name to its first signer). `trusted_keys` only badges entries as trusted.
    """

    def __init__(self, url: str | None = None, policy: Any = None, trusted_keys: Iterable[str] = (),
                 echo: bool = False) -> None:
        self.url = url or default_url()
        self.policy = policy if policy is not None else TrustPolicy()
        self.trusted_keys = frozenset(k.lower() for k in trusted_keys) | (self.policy.trusted or frozenset())
        self.engine: Engine = create_engine(self.url, echo=echo, pool_pre_ping=True)
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create_tables()

    def _create_tables(self) -> None:
        """Create what is missing; two processes opening a new database at once both succeed."""
        for attempt in range(5):
            try:
                metadata.create_all(self.engine)
                with self.engine.begin() as conn:
                    if self.dialect in ("sqlite", "postgresql"):
                        conn.execute(text(FTS_DDL if self.dialect == "sqlite" else PG_DDL))
                    _backfill_names(conn)
                return
            except (OperationalError, IntegrityError):
                # the other process created it between check and create
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))

    # -- writing ---------------------------------------------------------------------------------------
    def register(self, envelope: bytes, cid: str,
                 precheck: Callable[[str, bytes], None] | None = None) -> dict:
        """Verify a DSSE envelope and record it under `cid`; the same pair again is a no-op.

        `precheck(cid, envelope)` runs after the signature verified and before anything is stored.
        """
        cid = root_cid(cid)
        verified = verify_envelope(envelope, self.policy)
        if precheck is not None:
            precheck(cid, envelope)
        return self.add_verified(verified, envelope, cid)

    def add_verified(self, verified: Any, envelope: bytes, cid: str) -> dict:
        """Record an envelope that `verify_envelope` already accepted (register() is the public door)."""
        meta = verified.meta
        name, version = meta.name, int(meta.version)
        with self.engine.begin() as conn:
            held = conn.execute(select(documents.c.envelope).where(documents.c.cid == cid)).scalar()
            if held is not None:
                if same_envelope(held, envelope):
                    return self._get(conn, cid)
                raise ConflictError(f"CID {cid} is already registered with a different manifest; entries "
                                    "never change, so publish a new version instead")
            self._check_name(conn, name, version, verified.signer, cid)
            if conn.execute(select(names.c.folded).where(names.c.folded == fold(name))).first() is None:
                try:
                    conn.execute(names.insert().values(folded=fold(name), name=name, signer=verified.signer))
                except IntegrityError:  # the transaction is void: nothing of this entry stays
                    raise ConflictError(f"{name!r} was registered by someone else just now; pick another name"
                                        ) from None
            newest = conn.execute(select(func.max(entries.c.version)).where(entries.c.name == name)).scalar()
            latest = newest is None or version > newest
            if latest:
                if self.dialect == "sqlite":  # full-text search covers latest versions only
                    conn.execute(text("DELETE FROM entries_fts WHERE rowid IN "
                                      "(SELECT id FROM entries WHERE name = :name)"), {"name": name})
                conn.execute(update(entries).where(entries.c.name == name).values(latest=False))
            entry, document = rows_for(verified, envelope, cid, latest, self.trusted_keys)
            if self.dialect == "postgresql":
                entry["search_tsv"] = func.to_tsvector(literal_column("'simple'"), entry["search_text"])
            try:
                conn.execute(entries.insert().values(**entry))
            except IntegrityError:
                raise ConflictError(f"{name} v{version} was registered by someone else just now; "
                                    "publish the next version") from None
            conn.execute(documents.insert().values(**document))
            self._insert_people(conn, cid, meta)
            if latest and self.dialect == "sqlite":
                conn.execute(text("INSERT INTO entries_fts (rowid, body) SELECT id, :body FROM entries "
                                  "WHERE cid = :cid"), {"cid": cid, "body": entry["search_text"]})
            return self._get(conn, cid)

    @staticmethod
    def _insert_people(conn: Connection, cid: str, meta: Any) -> None:
        rows = [{"cid": cid, "node": str(i.get("node", ""))[:64], "rounds": nonneg(i.get("rounds")),
                 "tokens": nonneg(i.get("tokens"))} for i in meta.ledger or [] if i.get("node")]
        if rows:
            conn.execute(ledger.insert(), rows)
        nodes = {str(n)[:64] for n in meta.contributors or []} | {r["node"] for r in rows}
        if nodes:
            conn.execute(contributors.insert(), [{"cid": cid, "node": n} for n in sorted(nodes)])

    def listed(self, cid: str, envelope: bytes) -> dict | None:
        """The entry when exactly this (CID, envelope) pair is already registered, else None."""
        with self.engine.connect() as conn:
            held = conn.execute(select(documents.c.envelope).where(documents.c.cid == cid)).scalar()
            return self._get(conn, cid) if held is not None and same_envelope(held, envelope) else None

    def claimable(self, verified: Any, cid: str) -> None:
        """ConflictError unless `verified` could be registered under `cid` now (owner, version free);
        no write."""
        with self.engine.connect() as conn:
            self._check_name(conn, verified.meta.name, int(verified.meta.version), verified.signer, cid)

    @staticmethod
    def _check_name(conn: Connection, name: str, version: int, signer: str, cid: str) -> None:
        owner = conn.execute(select(names.c.signer, names.c.name).where(names.c.folded == fold(name))).first()
        if owner is not None and owner.signer != signer:
            held = ("" if owner.name == name
                    else f" (as {owner.name!r}: names are compared ignoring case and -_.)")
            raise ConflictError(f"{name!r} is published by key {owner.signer[:16]}…{held}, not by this "
                                f"signer {signer[:16]}…; pick another name")
        taken = conn.execute(select(entries.c.cid).where(entries.c.name == name,
                                                         entries.c.version == version)).scalar()
        if taken is not None and taken != cid:
            raise ConflictError(f"replay refused: {name} v{version} is already registered as {taken}; "
                                "publish the next version instead")

    # -- pending announcements -------------------------------------------------------------------------
    def hold(self, name: str, envelope: bytes, cid: str, now: float | None = None) -> None:
        """Keep an announcement whose DAG is not here yet; it binds nothing (see index.admit)."""
        now = time.time() if now is None else now
        if len(envelope) > MAX_PENDING_ENVELOPE:
            raise CommonsError(f"a model.sig over {MAX_PENDING_ENVELOPE >> 10} KiB is only taken once the "
                               "index holds its blocks; push them first, then announce")
        digest = hashlib.sha256(envelope).hexdigest()
        with self.engine.begin() as conn:
            conn.execute(delete(pending).where(pending.c.received_at < now - PENDING_SECONDS))
            known = conn.execute(select(pending.c.cid).where(pending.c.cid == cid,
                                                             pending.c.digest == digest))
            if known.first() is None:
                conn.execute(pending.insert().values(cid=cid, digest=digest, name=name,
                                                     envelope=bytes(envelope), received_at=now))
            count = conn.execute(select(func.count()).select_from(pending)).scalar() or 0
            if count > MAX_PENDING:
                oldest = select(pending.c.received_at).order_by(pending.c.received_at).limit(1).offset(
                    count - MAX_PENDING - 1).scalar_subquery()
                conn.execute(delete(pending).where(pending.c.received_at <= oldest))

    def held(self, name: str) -> list[tuple[str, bytes]]:
        """(CID, envelope) of the pending announcements of `name`, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(pending.c.cid, pending.c.envelope).where(pending.c.name == name)
                                .order_by(pending.c.received_at).limit(100))
            return [(row.cid, bytes(row.envelope)) for row in rows]

    def release(self, cid: str, envelope: bytes | None = None) -> None:
        """Forget pending announcements of `cid` (of this envelope only, when given)."""
        query = delete(pending).where(pending.c.cid == cid)
        if envelope is not None:
            query = query.where(pending.c.digest == hashlib.sha256(envelope).hexdigest())
        with self.engine.begin() as conn:
            conn.execute(query)

    def record_presence(self, node: str, seen_at: float | None = None) -> None:
        seen_at = time.time() if seen_at is None else seen_at
        with self.engine.begin() as conn:
            done = conn.execute(update(presence).where(presence.c.node == node).values(seen_at=seen_at))
            if done.rowcount == 0:
                conn.execute(presence.insert().values(node=node, seen_at=seen_at))

    # -- reading ---------------------------------------------------------------------------------------
    def get(self, cid: str) -> dict:
        with self.engine.connect() as conn:
            return self._get(conn, cid)

    def _get(self, conn: Connection, cid: str) -> dict:
        query = select(*SUMMARY_COLUMNS, documents.c.meta_json, documents.c.files_json).join(
            documents, documents.c.cid == entries.c.cid).where(entries.c.cid == cid)
        row = conn.execute(query).mappings().first()
        if row is None:
            raise CommonsError(f"no entry with CID {cid} in the index; check the CID or `commons publish` it")
        return to_entry(row, row["meta_json"], row["files_json"])

    def resolve(self, name: str, version: int | None = None) -> dict:
        """The latest (or the given) version of `name`."""
        query = select(entries.c.cid).where(entries.c.name == name)
        query = query.where(entries.c.version == version) if version is not None else query.where(
            entries.c.latest.is_(True))
        with self.engine.connect() as conn:
            cid = conn.execute(query).scalar()
            if cid is not None:
                return self._get(conn, cid)
            known = conn.execute(select(entries.c.version).where(entries.c.name == name)
                                 .order_by(entries.c.version)).scalars().all()
        if known:
            raise CommonsError(f"{name} has no version {version}; known versions: "
                               f"{', '.join(map(str, known))}")
        raise CommonsError(f"no adapter or dataset named {name!r} in the index; search for it on the index "
                           "page or check the spelling")

    def versions(self, name: str) -> list[dict]:
        cols = [entries.c.cid, entries.c.version, entries.c.created, entries.c.signer]
        with self.engine.connect() as conn:
            rows = conn.execute(select(*cols).where(entries.c.name == name)
                                .order_by(entries.c.version.desc())).mappings().all()
        return [dict(r) for r in rows]

    def search(self, q: str = "", base_model: str | None = None, license: str | None = None,
               task: str | None = None, trusted: bool | None = None, kind: str | None = "adapter",
               max_size: int | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
        """Latest version of each matching name: best full-text match first, else newest first."""
        query = select(entries.c.cid).where(entries.c.latest.is_(True))
        for column, value in ((entries.c.kind, kind), (entries.c.base_model, base_model),
                              (entries.c.license, license), (entries.c.task, task)):
            if value:
                query = query.where(column == value)
        if trusted is not None:
            query = query.where(entries.c.trusted.is_(trusted))
        if max_size is not None:
            query = query.where(entries.c.size <= max_size)
        terms = fts_terms(q)
        order = [entries.c.registered_at.desc(), entries.c.name]
        if terms and self.dialect == "sqlite":
            # A plain join (not a subquery) lets FTS5 compute bm25 only for rows that pass the filters.
            query = query.join(text("entries_fts"), text("entries_fts.rowid = entries.id")).where(
                text("entries_fts MATCH :match").bindparams(match=" AND ".join(f'"{t}"*' for t in terms)))
            order = [literal_column("entries_fts.rank")]  # alone: a tie-breaker doubles the sort cost
        elif terms and self.dialect == "postgresql":
            tsquery = func.to_tsquery(literal_column("'simple'"), " & ".join(f"{t}:*" for t in terms))
            query = query.where(entries.c.search_tsv.op("@@")(tsquery))
            order = [func.ts_rank(entries.c.search_tsv, tsquery).desc(), *order]
        elif terms:
            for t in terms:
                query = query.where(entries.c.search_text.like(f"%{t}%"))
        query = query.order_by(*order).limit(max(1, min(limit, MAX_LIMIT))).offset(max(0, offset))
        with self.engine.connect() as conn:
            cids = list(conn.execute(query).scalars())
            if not cids:
                return []
            rows = conn.execute(select(*SUMMARY_COLUMNS, documents.c.meta_json).join(
                documents, documents.c.cid == entries.c.cid).where(entries.c.cid.in_(cids))).mappings()
            by_cid = {r["cid"]: r for r in rows}
        return [to_entry(by_cid[c], by_cid[c]["meta_json"]) for c in cids]

    def facets(self, kind: str = "adapter") -> dict[str, list[str]]:
        """Distinct filter values for the list page's drop-downs."""
        out = {}
        with self.engine.connect() as conn:
            for col in ("base_model", "license", "task"):
                c = entries.c[col]
                out[col] = list(conn.execute(
                    select(c).where(entries.c.kind == kind, entries.c.latest.is_(True), c != "")
                    .distinct().order_by(c)).scalars())
        return out

    def leaderboard(self, limit: int = 100) -> list[dict]:
        tokens = func.sum(ledger.c.tokens)
        query = (select(ledger.c.node, func.sum(ledger.c.rounds).label("rounds"), tokens.label("tokens"),
                        func.count(func.distinct(ledger.c.cid)).label("adapters"))
                 .group_by(ledger.c.node).order_by(tokens.desc(), ledger.c.node).limit(limit))
        with self.engine.connect() as conn:
            return [{"node": r.node, "rounds": int(r.rounds or 0), "tokens": int(r.tokens or 0),
                     "adapters": int(r.adapters)} for r in conn.execute(query)]

    def stats(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        adapter = entries.c.kind == "adapter"
        queries = {
            "adapters": select(func.count(func.distinct(entries.c.name))).where(adapter),
            "adapter_versions": select(func.count()).select_from(entries).where(adapter),
            "datasets": select(func.count(func.distinct(entries.c.name))).where(entries.c.kind == "dataset"),
            "campaigns": select(func.count(func.distinct(entries.c.campaign))).where(adapter,
                                                                                   entries.c.campaign != ""),
            "rounds": select(func.coalesce(func.sum(entries.c.rounds), 0)).where(adapter),
            "tokens": select(func.coalesce(func.sum(ledger.c.tokens), 0)),
            "contributors": select(func.count(func.distinct(contributors.c.node))),
            "live_nodes": select(func.count()).select_from(presence).where(
                presence.c.seen_at >= now - LIVE_SECONDS),
        }
        with self.engine.connect() as conn:
            return {key: int(conn.execute(q).scalar() or 0) for key, q in queries.items()}


def _backfill_names(conn: Connection) -> None:
    """A database from before `names` existed: each name's owner is the signer of its first entry."""
    if conn.execute(select(names.c.folded).limit(1)).first() is not None:
        return
    owners: dict[str, tuple[str, str]] = {}
    for row in conn.execute(select(entries.c.name, entries.c.signer).order_by(entries.c.id)):
        owners.setdefault(fold(row.name), (row.name, row.signer))
    if owners:
        conn.execute(names.insert(), [{"folded": f, "name": n, "signer": s} for f, (n, s) in owners.items()])


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=5000")  # first: switching to WAL waits for a writer instead of failing
    cur.execute("PRAGMA journal_mode=WAL")  # the web server reads while `commons data add` writes
    # WAL keeps the file consistent; only the last commit may be lost
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
