"""Valid example events for every type, shared by the tests."""

from __future__ import annotations

import uuid

from interactions_client.rules import RULES, ProductIdRule
from interactions_client.v1.event_pb2 import Event, EventType

_DETAILS = {
    "search": {"search": {"query": "laptop"}},
    "page_view": {"page_view": {"page_path": "/deals", "referrer": "https://example.com/"}},
    "product_view": {"product_view": {"product_name": "Laptop 14"}},
    "cart_action": {"cart_action": {"quantity": 2, "action": "add"}},
    "wishlist_action": {"wishlist_action": {"action": "add"}},
}
_VALUES = {"update_cart_quantity": 3, "wishlist": 1, "review": 5}


def valid_event(event_type: int, *, user_id: str = "u1", product_id: str | None = None, **fields: object) -> Event:
    """A minimal valid event of the type; `fields` override (None clears a field)."""
    rule = RULES[event_type]
    event = Event(event_id=str(uuid.uuid4()), event_type=event_type, user_id=user_id)
    if product_id is not None:
        event.product_id = product_id
    elif rule.product_id != ProductIdRule.PRODUCT_ID_RULE_NOT_ALLOWED:
        event.product_id = "p1"
    if rule.session_required:
        event.session_id = "s1"
    if rule.name in _VALUES:
        event.event_value = _VALUES[rule.name]
    if rule.details_required and rule.details:
        event.MergeFrom(Event(**_DETAILS[rule.details]))  # type: ignore[arg-type]
    if event_type == EventType.EVENT_TYPE_CUSTOM:
        event.custom_type = "gift_card_redeemed"
    for name, value in fields.items():
        if value is None:
            event.ClearField(name)
        elif isinstance(value, dict):
            getattr(event, name).CopyFrom(type(getattr(event, name))(**value))
        else:
            setattr(event, name, value)
    return event


ALL_TYPES = sorted(RULES)
