"""The event catalog, read once from the schema's `rule` options.

protos/interactions/v1/event.proto is the only place the per-type rules are
written; this module turns them into plain, precomputed tables so that
validation and the server never touch descriptors per event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from interactions_client.v1 import event_pb2, rules_pb2

EventType = event_pb2.EventType
ProductIdRule = rules_pb2.ProductIdRule
ValueRule = rules_pb2.ValueRule
SyncTarget = rules_pb2.SyncTarget

_PREFIX = "EVENT_TYPE_"


@dataclass(frozen=True, slots=True)
class TypeRule:
    """The rules of one event type, as plain attributes."""

    event_type: int
    name: str  # the stored name, e.g. "add_to_cart"
    description: str
    product_id: ProductIdRule.ValueType
    value: ValueRule.ValueType
    default_value: int | None  # None: the caller must set event_value
    details: str | None  # the `details` oneof member the type takes
    details_required: bool
    session_required: bool
    sync: SyncTarget.ValueType
    ml_weight: float | None
    proto: rules_pb2.EventRule
    # Derived flags, so that hot paths test plain booleans.
    product_required: bool
    product_allowed: bool
    syncs: bool


def _read_rules() -> dict[int, TypeRule]:
    details_members = {f.name for f in event_pb2.Event.DESCRIPTOR.oneofs_by_name["details"].fields}
    rules: dict[int, TypeRule] = {}
    for value in event_pb2.EventType.DESCRIPTOR.values:
        if value.number == EventType.EVENT_TYPE_UNSPECIFIED:
            continue
        options = value.GetOptions()
        if not options.HasExtension(rules_pb2.rule):
            raise RuntimeError(f"{value.name} declares no (interactions.v1.rule) option")
        rule = options.Extensions[rules_pb2.rule]
        if rule.details and rule.details not in details_members:
            raise RuntimeError(f"{value.name}: details {rule.details!r} is not a member of Event.details")
        rules[value.number] = TypeRule(
            event_type=value.number,
            name=value.name.removeprefix(_PREFIX).lower(),
            description=rule.description,
            product_id=rule.product_id,
            value=rule.value,
            default_value=rule.default_value if rule.HasField("default_value") else None,
            details=rule.details or None,
            details_required=rule.details_required,
            session_required=rule.session_required,
            sync=rule.sync,
            ml_weight=rule.ml_weight if rule.HasField("ml_weight") else None,
            proto=rule,
            product_required=rule.product_id == ProductIdRule.PRODUCT_ID_RULE_REQUIRED,
            product_allowed=rule.product_id != ProductIdRule.PRODUCT_ID_RULE_NOT_ALLOWED,
            syncs=rule.sync != SyncTarget.SYNC_TARGET_NONE,
        )
    return rules


RULES: Mapping[int, TypeRule] = MappingProxyType(_read_rules())
"""Every event type (EVENT_TYPE_CUSTOM included) by its EventType number."""

CUSTOM = RULES[EventType.EVENT_TYPE_CUSTOM]

STANDARD: Mapping[str, TypeRule] = MappingProxyType({r.name: r for r in RULES.values() if r is not CUSTOM})
"""The seed's types by stored name."""


def stored_name(event: event_pb2.Event) -> str:
    """The name an event is stored under: its seed name, or its custom_type."""
    if event.event_type == EventType.EVENT_TYPE_CUSTOM:
        return event.custom_type
    return RULES[event.event_type].name
