"""log_many's bookkeeping, shared by both clients: pre-validate, chunk to the
service's batch limit, and fold the per-chunk answers into one result."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from interactions_client.events import with_event_id
from interactions_client.limits import MAX_BATCH_EVENTS
from interactions_client.results import BatchResult, Rejection
from interactions_client.rpc_protos import Violation
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2 import LogEventsRequest, LogEventsResponse, RejectedEvent
from interactions_client.validation import validate as validate_event


@dataclass(slots=True)
class Chunk:
    """Events for one LogEvents call and their positions in the caller's input."""

    events: list[Event] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    def request(self) -> LogEventsRequest:
        return LogEventsRequest(events=self.events)


def server_violations(rejected: RejectedEvent) -> list[Violation]:
    return [Violation(v.field, v.description) for v in rejected.violations]


def chunks(events: Iterable[Event], result: BatchResult, *, validate: bool) -> Iterator[Chunk]:
    """Chunks of at most MAX_BATCH_EVENTS; events failing pre-validation go to
    `result.rejected` (local) instead."""
    chunk = Chunk()
    for position, original in enumerate(events):
        event = with_event_id(original)
        violations = validate_event(event) if validate else []
        if violations:
            local = [Violation(v.field, v.description) for v in violations]
            result.rejected.append(Rejection(event, local, local=True, index=position))
            continue
        chunk.events.append(event)
        chunk.positions.append(position)
        if len(chunk.events) == MAX_BATCH_EVENTS:
            yield chunk
            chunk = Chunk()
    if chunk.events:
        yield chunk


def fold(result: BatchResult, chunk: Chunk, response: LogEventsResponse) -> None:
    result.accepted += response.accepted_count
    result.duplicate += response.duplicate_count
    for rejected in response.rejected:
        event = chunk.events[rejected.index]
        result.rejected.append(
            Rejection(event, server_violations(rejected), local=False, index=chunk.positions[rejected.index])
        )


def finish(result: BatchResult) -> BatchResult:
    result.rejected.sort(key=lambda r: r.index)
    return result
