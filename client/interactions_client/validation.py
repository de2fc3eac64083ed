"""Validation of events against the schema's rules and the service's bounds.

The same code runs in callers (pre-validation) and in the server. It reads
the precomputed tables of `rules`, never descriptors, so it stays cheap on the
server's hot path. Every violation names its field; all are reported.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from interactions_client import limits
from interactions_client.rules import CUSTOM, RULES, STANDARD, SyncTarget, TypeRule, ValueRule
from interactions_client.v1.event_pb2 import Event, FieldViolation

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_SNAKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")


def custom_type_problem(name: str) -> str | None:
    """What is wrong with `name` as a custom type's name (None: nothing)."""
    if not name:
        return "is required for EVENT_TYPE_CUSTOM"
    if len(name) > limits.MAX_CUSTOM_TYPE_LENGTH or not _SNAKE.fullmatch(name):
        return f"must be lower snake case, at most {limits.MAX_CUSTOM_TYPE_LENGTH} characters"
    if name in STANDARD:
        return f"{name!r} is a standard type; use its EventType value"
    return None


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
# Id fields of the details payloads: checked like user_id (non-blank when given).
_DETAIL_IDS: dict[str, tuple[str, ...]] = {"login": ("anonymous_id",)}


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
    event_id = event.event_id
    if event_id and not _UUID.fullmatch(event_id):
        out.append(violation("event_id", "must be a UUID such as 123e4567-e89b-12d3-a456-426614174000"))
    user_id = event.user_id
    # The common case (a short, non-blank id without NUL) without a call.
    if not user_id or len(user_id) > limits.MAX_ID_LENGTH or "\x00" in user_id or user_id.isspace():
        _text(out, "user_id", user_id, limits.MAX_ID_LENGTH, required=True)

    check = _TYPE_CHECKS.get(event.event_type)
    if check is None:
        if event.event_type == 0:
            out.append(violation("event_type", "is required"))
        else:
            out.append(violation("event_type", f"{event.event_type} is not a known event type"))
        _text(out, "session_id", event.session_id, limits.MAX_ID_LENGTH, required=False)
        _text(out, "product_id", event.product_id, limits.MAX_ID_LENGTH, required=False)
    else:
        check(out, event)

    if event.HasField("occurred_at"):
        _check_time(out, event, time.time() if now is None else now)
    if event.attributes:
        _check_attributes(out, event)
    return out


_TypeCheck = Callable[[list[FieldViolation], Event], None]


def _type_check(rule: TypeRule) -> _TypeCheck:
    """The checks of one event type, with everything that depends only on its
    rule worked out once (at import), so that the per-event work is a few
    attribute reads and comparisons."""
    is_custom = rule is CUSTOM
    session_required = rule.session_required
    product_allowed = rule.product_allowed
    product_required = rule.product_required
    lowest, highest, meaning = _VALUE_RANGES[rule.value]
    purchase_hint = (
        " (one purchase); the price does not belong in event_value, put it in attributes"
        if rule.sync == SyncTarget.SYNC_TARGET_PURCHASE_HISTORY
        else ""
    )
    value_required = rule.default_value is None
    details = rule.details
    details_required = rule.details_required
    takes = f"take only {details} details" if details else "take no details"
    detail_text = _DETAIL_TEXT.get(details, ()) if details else ()
    detail_ids = _DETAIL_IDS.get(details, ()) if details else ()
    max_id = limits.MAX_ID_LENGTH

    def check(out: list[FieldViolation], event: Event) -> None:
        name = rule.name
        if is_custom:
            custom = event.custom_type
            if (problem := custom_type_problem(custom)) is not None:
                out.append(violation("custom_type", problem))
            name = custom or name
        elif event.custom_type:
            out.append(violation("custom_type", "is only for EVENT_TYPE_CUSTOM events"))

        session_id = event.session_id
        if not session_id:
            if session_required:
                out.append(violation("session_id", "is required"))
        elif len(session_id) > max_id or "\x00" in session_id or session_id.isspace():
            _text(out, "session_id", session_id, max_id, required=session_required)
        product_id = event.product_id
        if not product_allowed:
            if product_id:
                out.append(violation("product_id", f"is not allowed for {name} events"))
        elif not product_id:
            if product_required:
                out.append(violation("product_id", "is required"))
        elif len(product_id) > max_id or "\x00" in product_id or product_id.isspace():
            _text(out, "product_id", product_id, max_id, required=product_required)

        if event.HasField("event_value"):
            value = event.event_value
            if not lowest <= value <= highest:
                out.append(violation("event_value", f"{value} is out of range: for {name} it {meaning}{purchase_hint}"))
        elif value_required:
            out.append(violation("event_value", f"is required for {name}: it {meaning}"))

        member = event.WhichOneof("details")
        if member is None:
            if details_required:
                out.append(violation(f"{details}", f"is required for {name} events"))
        elif member != details:
            out.append(violation(member, f"is not allowed for {name} events, which {takes}"))
        else:
            payload = getattr(event, member)
            for field, max_length, required in detail_text:
                value_text: str = getattr(payload, field)
                _text(out, f"{member}.{field}", value_text, max_length, required=required, blank_ok=not required)
            for field in detail_ids:
                id_text: str = getattr(payload, field)
                _text(out, f"{member}.{field}", id_text, max_id, required=False)
                if id_text and id_text == event.user_id:
                    out.append(
                        violation(f"{member}.{field}", "must differ from user_id (an id cannot be linked to itself)")
                    )
            if member == "cart_action" and not 0 <= payload.quantity <= limits.MAX_QUANTITY:
                out.append(violation("cart_action.quantity", f"must be from 0 to {limits.MAX_QUANTITY}"))

    return check


_TYPE_CHECKS: dict[int, _TypeCheck] = {number: _type_check(rule) for number, rule in RULES.items()}


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
    max_key, max_value = limits.MAX_ATTRIBUTE_KEY_LENGTH, limits.MAX_ATTRIBUTE_VALUE_LENGTH
    for key, value in attributes.items():
        # The common case (a short key and value, no NUL, a key not blank) without building the field name.
        if (
            key
            and len(key) <= max_key
            and len(value) <= max_value
            and "\x00" not in key
            and "\x00" not in value
            and not key.isspace()
        ):
            continue
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
