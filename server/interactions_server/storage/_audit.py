"""The SQL of the audit log (table audit_log, migrations/0007).

A record is written in the transaction of what it records (a deletion
commits with its record or not at all); it names a user only by the
keyed hash of interactions_server.keyring (Keyring.subject_hash).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg

from interactions_server.keyring import SubjectHash

DELETE_USER_DATA = "delete_user_data"  # AdminService.DeleteUserData


class AuditRecord(NamedTuple):
    """One audited action. `actor`: who asked ("token:<name>", "unauthenticated"
    on a server without tokens, "system:<job>" for the server's own jobs);
    `subject`: the user it was about, hashed (None: not one user's data);
    `counts`: what it did (rows per kind); `detail`: anything else (JSON)."""

    action: str
    actor: str
    subject: SubjectHash | None
    counts: Mapping[str, int]
    detail: Mapping[str, Any] = {}


class StoredAuditRecord(NamedTuple):
    id: int
    at: datetime
    action: str
    actor: str
    subject: SubjectHash | None
    counts: dict[str, int]
    detail: dict[str, Any]


_INSERT = """
INSERT INTO audit_log (action, actor, subject_hash, subject_key, counts, detail)
VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)
RETURNING id
"""

_SELECT = """
SELECT id, at, action, actor, subject_key, subject_hash, counts::text, detail::text FROM audit_log
WHERE ($1::bytea IS NULL OR subject_hash = $1) AND ($2::text IS NULL OR action = $2)
ORDER BY id DESC
LIMIT $3
"""


def actor_of(token_name: str | None) -> str:
    """The actor of a call: its token's name, or "unauthenticated" when tokens are off."""
    return "unauthenticated" if token_name is None else f"token:{token_name}"


async def record_audit(conn: asyncpg.Connection, record: AuditRecord) -> int:
    """Writes `record` in `conn`'s transaction (call it inside the transaction
    that does what it records); returns its id."""
    subject = record.subject
    record_id: int = await conn.fetchval(
        _INSERT,
        record.action,
        record.actor,
        None if subject is None else subject.digest,
        None if subject is None else subject.version,
        json.dumps(dict(record.counts)),
        json.dumps(dict(record.detail), default=str),
    )
    return record_id


async def audit_records(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    subject: SubjectHash | None = None,
    action: str | None = None,
    limit: int = 100,
) -> list[StoredAuditRecord]:
    """The newest records first, of one subject and/or action when given."""
    rows = await conn.fetch(_SELECT, None if subject is None else subject.digest, action, limit)
    return [
        StoredAuditRecord(
            r["id"],
            r["at"],
            r["action"],
            r["actor"],
            None if r["subject_hash"] is None else SubjectHash(r["subject_key"], bytes(r["subject_hash"])),
            json.loads(r["counts"]),
            json.loads(r["detail"]),
        )
        for r in rows
    ]
