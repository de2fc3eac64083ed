"""Validation of events against the schema's rules and the service's bounds.

The same code runs in callers (pre-validation) and in the server. It reads
the precomputed tables of `rules`, never descriptors, so it stays cheap on the
server's hot path. Every violation names its field; all are reported.
"""

from __future__ import annotations

import re
import time

from interactions_client import limits
from interactions_client.rules import CUSTOM, RULES, STANDARD, SyncTarget, TypeRule, ValueRule
from interactions_client.v1.event_pb2 import Event, FieldViolation

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_SNAKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")

# (lowest, highest, what the value means) per ValueRule.
_VALUE_RANGES: dict[int, tuple[int, int, str]] = {
    ValueRule.VALUE_RULE_ALWAYS_ONE: (1, 1, "must be 1"),
    ValueRule.VALUE_RULE_QUANTITY: (1, limits.MAX_QUANTITY, f"is a quantity from 1 to {limits.MAX_QUANTITY}"),
    ValueRule.VALUE_RULE_QUANTITY_OR_ALL: (
        0,
        limits.MAX_QUANTITY,
        f"is a quantity from 1 to {limits.MAX_QUANTITY}, or 0 to remove all",
    ),
    ValueRule.VALUE_RULE_NEW_QUANTITY: (
        0,
        limits.MAX_QUANTITY,
        f"is the new quantity, from 0 (remove the line) to {limits.MAX_QUANTITY}",
    ),
    ValueRule.VALUE_RULE_ADD_OR_REMOVE: (0, 1, "must be 1 (add) or 0 (remove)"),
    ValueRule.VALUE_RULE_RATING: (1, 5, "is a star rating from 1 to 5"),
    ValueRule.VALUE_RULE_ANY: (-(2**63), 2**63 - 1, "is any integer"),
}

# Text fields of the details payloads: (field, max length, required).
_DETAIL_TEXT: dict[str, tuple[tuple[str, int, bool], ...]] = {
    "search": (("query", limits.MAX_QUERY_LENGTH, True),),
    "page_view": (("page_path", limits.MAX_URL_LENGTH, False), ("referrer", limits.MAX_URL_LENGTH, False)),
    "product_view": (("product_name", limits.MAX_TEXT_LENGTH, False),),
    "cart_action": (("action", limits.MAX_TEXT_LENGTH, False),),
    "wishlist_action": (("action", limits.MAX_TEXT_LENGTH, False),),
}


def violation(field: str, description: str) -> FieldViolation:
    return FieldViolation(field=field, description=description)


def _text(
    out: list[FieldViolation], field: str, value: str, max_length: int, *, required: bool, blank_ok: bool = False
) -> None:
    """Checks a text field; empty means absent."""
    if not value:
        if required:
            out.append(violation(field, "is required"))
        return
    if len(value) > max_length:
        out.append(violation(field, f"is {len(value)} characters long; the limit is {max_length}"))
    elif "\x00" in value:
        out.append(violation(field, "must not contain NUL characters"))
    elif not blank_ok and value.isspace():
        out.append(violation(field, "must not be blank"))


def validate(event: Event, *, now: float | None = None) -> list[FieldViolation]:
    """All violations of `event`; an empty list means it is valid.

    `now` (epoch seconds) bounds occurred_at; it defaults to the current time.
    """
    out: list[FieldViolation] = []
    if event.event_id and not _UUID.fullmatch(event.event_id):
        out.append(violation("event_id", "must be a UUID such as 123e4567-e89b-12d3-a456-426614174000"))
    _text(out, "user_id", event.user_id, limits.MAX_ID_LENGTH, required=True)

    rule = RULES.get(event.event_type)
    if rule is None:
        if event.event_type == 0:
            out.append(violation("event_type", "is required"))
        else:
            out.append(violation("event_type", f"{event.event_type} is not a known event type"))
        _text(out, "session_id", event.session_id, limits.MAX_ID_LENGTH, required=False)
        _text(out, "product_id", event.product_id, limits.MAX_ID_LENGTH, required=False)
    else:
        _check_type(out, event, rule)

    if event.HasField("occurred_at"):
        _check_time(out, event, time.time() if now is None else now)
    if event.attributes:
        _check_attributes(out, event)
    return out


def _check_type(out: list[FieldViolation], event: Event, rule: TypeRule) -> None:
    name = rule.name
    if rule is CUSTOM:
        custom = event.custom_type
        if not custom:
            out.append(violation("custom_type", "is required for EVENT_TYPE_CUSTOM"))
        elif len(custom) > limits.MAX_CUSTOM_TYPE_LENGTH or not _SNAKE.fullmatch(custom):
            out.append(
                violation(
                    "custom_type", f"must be lower snake case, at most {limits.MAX_CUSTOM_TYPE_LENGTH} characters"
                )
            )
        elif custom in STANDARD:
            out.append(violation("custom_type", f"{custom!r} is a standard type; use its EventType value"))
        name = custom or name
    elif event.custom_type:
        out.append(violation("custom_type", "is only for EVENT_TYPE_CUSTOM events"))

    _text(out, "session_id", event.session_id, limits.MAX_ID_LENGTH, required=rule.session_required)
    if not rule.product_allowed:
        if event.product_id:
            out.append(violation("product_id", f"is not allowed for {name} events"))
    else:
        _text(out, "product_id", event.product_id, limits.MAX_ID_LENGTH, required=rule.product_required)

    if event.HasField("event_value"):
        lowest, highest, meaning = _VALUE_RANGES[rule.value]
        value = event.event_value
        if not lowest <= value <= highest:
            text = f"{value} is out of range: for {name} it {meaning}"
            if rule.sync == SyncTarget.SYNC_TARGET_PURCHASE_HISTORY:
                text += " (one purchase); the price does not belong in event_value, put it in attributes"
            out.append(violation("event_value", text))
    elif rule.default_value is None:
        out.append(violation("event_value", f"is required for {name}: it {_VALUE_RANGES[rule.value][2]}"))

    member = event.WhichOneof("details")
    if member is None:
        if rule.details_required:
            out.append(violation(f"{rule.details}", f"is required for {name} events"))
    elif member != rule.details:
        takes = f"take only {rule.details} details" if rule.details else "take no details"
        out.append(violation(member, f"is not allowed for {name} events, which {takes}"))
    else:
        payload = getattr(event, member)
        for field, max_length, required in _DETAIL_TEXT[member]:
            value_text: str = getattr(payload, field)
            _text(out, f"{member}.{field}", value_text, max_length, required=required, blank_ok=not required)
        if member == "cart_action" and not 0 <= payload.quantity <= limits.MAX_QUANTITY:
            out.append(violation("cart_action.quantity", f"must be from 0 to {limits.MAX_QUANTITY}"))


def _check_time(out: list[FieldViolation], event: Event, now: float) -> None:
    ts = event.occurred_at
    if not 0 <= ts.nanos < 1_000_000_000:
        out.append(violation("occurred_at.nanos", "must be from 0 to 999,999,999"))
    elif ts.seconds < 0:
        out.append(violation("occurred_at", "must not be before 1970-01-01"))
    elif ts.seconds > now + limits.MAX_FUTURE_SECONDS:
        out.append(
            violation(
                "occurred_at",
                f"is {ts.seconds - int(now)} s in the future; at most {limits.MAX_FUTURE_SECONDS} s is allowed",
            )
        )


def _check_attributes(out: list[FieldViolation], event: Event) -> None:
    attributes = event.attributes
    if len(attributes) > limits.MAX_ATTRIBUTES:
        out.append(violation("attributes", f"has {len(attributes)} entries; the limit is {limits.MAX_ATTRIBUTES}"))
    for key, value in attributes.items():
        field = f"attributes[{key[: limits.MAX_ATTRIBUTE_KEY_LENGTH]}]"
        if not key or key.isspace():
            out.append(violation(field, "key must not be blank"))
        elif len(key) > limits.MAX_ATTRIBUTE_KEY_LENGTH:
            out.append(
                violation(field, f"key is {len(key)} characters long; the limit is {limits.MAX_ATTRIBUTE_KEY_LENGTH}")
            )
        elif "\x00" in key:
            out.append(violation(field, "key must not contain NUL characters"))
        _text(out, field, value, limits.MAX_ATTRIBUTE_VALUE_LENGTH, required=False, blank_ok=True)
