"""The `event_types` filter of a read request (exports, ListUserEvents, the
subscription): EventType numbers, EVENT_TYPE_CUSTOM for every custom type,
anything else INVALID_ARGUMENT naming `event_types`."""

from __future__ import annotations

from collections.abc import Sequence

from interactions_client.rules import CUSTOM, RULES, STANDARD
from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server import storage
from interactions_server.errors import InvalidArgument

_STANDARD_NAMES = sorted(STANDARD)


def type_filter(event_types: Sequence[int]) -> storage.TypeFilter:
    names: list[str] = []
    custom = False
    for number in event_types:
        rule = RULES.get(number)
        if rule is None:
            violation = FieldViolation(field="event_types", description=f"{number} is not a known event type")
            raise InvalidArgument([violation])
        if rule is CUSTOM:
            custom = True
        else:
            names.append(rule.name)
    return storage.TypeFilter(sorted(set(names)), custom, _STANDARD_NAMES)
