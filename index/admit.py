"""Admission: an announcement binds NAME@VERSION to a CID only once the index holds that CID's DAG and the
DAG carries exactly the announced envelope and the files it signs.

  announce ─▶ signature ok, name its signer's, version free? ─▶ DAG held? ─yes─▶ fetch_signed checks ─▶ listed
                                                                           └no──▶ pending: binds nothing
  pending  ─▶ settled whenever its name is resolved or announced: listed once the DAG is held and checks out,
              dropped once it is held and does not (or its version went to the right CID meanwhile)

Anyone may copy a publisher's model.sig and announce it with an unrelated CID; that announcement can only
wait. The checks pin one root CID per signed content (`protocol.content.fetch`, step 5), so the publisher's
own CID is the only one that can ever be listed, whoever announced first.

    >>> entry, verified = admit(db, store, envelope, cid)     # entry None: pending
"""

from __future__ import annotations

from index.db import IndexDB, root_cid
from protocol.content.blockstore import BlockStore
from protocol.content.fetch import Missing, fetch_signed
from protocol.errors import CommonsError
from protocol.signing.manifest import Verified, verify_envelope


def check_held(store: BlockStore, policy: object):
    """register()'s precheck: the DAG under `cid` in `store` is exactly what `envelope` signs (Missing if not
    held)."""

    def check(cid: str, envelope: bytes) -> None:
        fetch_signed(cid, store, (), policy, envelope=envelope)  # type: ignore[arg-type]

    return check


def admit(db: IndexDB, store: BlockStore, envelope: bytes, cid: str) -> tuple[dict | None, Verified]:
    """Register `envelope` under `cid` when its DAG is held and checks out, else hold it pending (entry None).

    Raises VerifyError (bad signature, a DAG that does not carry exactly this envelope), ConflictError (the
    name is another signer's, the version another CID's) or CommonsError (a malformed CID).
    """
    cid = root_cid(cid)
    verified = verify_envelope(envelope, db.policy)
    entry = db.listed(cid, envelope)
    if entry is not None:  # announced again: its DAG was checked once, walking it again is work for nothing
        return entry, verified
    db.claimable(verified, cid)  # a squat or a taken version is refused before anything is kept
    try:
        entry = db.register(envelope, cid, precheck=check_held(store, db.policy))
    except Missing:
        db.hold(verified.meta.name, envelope, cid)
        return None, verified
    db.release(cid)
    return entry, verified


def settle(db: IndexDB, store: BlockStore, name: str) -> None:
    """List or drop the pending announcements of `name` whose DAG is now held."""
    for cid, envelope in db.held(name):
        if not store.has(cid):
            continue  # its root is not even here: nothing to look at yet
        try:
            db.register(envelope, cid, precheck=check_held(store, db.policy))
        except Missing:
            continue  # still not here: keep waiting
        except CommonsError:
            pass  # refused, or its version went to the right CID: it can never be listed
        db.release(cid, envelope)
