"""The write path: a batch of events in, one transaction, per-event outcomes out.

(Stub: the implementation is being written; the interface is final.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from interactions_client.v1.event_pb2 import Event, FieldViolation


@dataclass(slots=True)
class Rejection:
    index: int
    event_id: str
    violations: list[FieldViolation]


@dataclass(slots=True)
class BatchResult:
    """Outcome of one batch; lists are indexed like the request's events."""

    event_ids: list[str] = field(default_factory=list)  # server-assigned when the request had none
    duplicate: list[bool] = field(default_factory=list)  # False for rejected events
    rejected: list[Rejection] = field(default_factory=list)
    accepted_count: int = 0
    duplicate_count: int = 0


class Ingestor:
    """Validates and writes batches. Database failures propagate as asyncpg /
    OSError exceptions (the caller maps them to UNAVAILABLE)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def write(self, events: Sequence[Event]) -> BatchResult:
        raise NotImplementedError
