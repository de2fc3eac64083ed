"""What the client's writes return."""

from __future__ import annotations

from dataclasses import dataclass, field

from interactions_client.rpc_protos import Violation
from interactions_client.v1.event_pb2 import Event


@dataclass(frozen=True, slots=True)
class LogResult:
    """One logged event. `duplicate`: it had been logged before, nothing was applied again."""

    event_id: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Rejection:
    """An event that was not written, and why.

    `local` is True when pre-validation rejected it in this process (nothing
    was sent). `index` is the event's position in the caller's input: the list
    given to log_many, or the order of `send` calls on a streamer. `tag` is
    what the caller passed to `send` with the event.
    """

    event: Event
    violations: list[Violation]
    local: bool
    index: int
    tag: object = None


@dataclass(slots=True)
class BatchResult:
    """Outcome of log_many: accepted + duplicate + len(rejected) == number of events."""

    accepted: int = 0
    duplicate: int = 0
    rejected: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LinkResult:
    """What link_identity did. `already_linked`: the anonymous id was linked to
    this person before, nothing changed; `events_moved`: its events that moved
    under the person."""

    already_linked: bool
    events_moved: int


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an id belongs to: `user_id` the person (the id itself when not
    linked), `anonymous_ids` the ids linked to it."""

    user_id: str
    anonymous_ids: list[str]
