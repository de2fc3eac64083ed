"""Building events: one typed method per seed type, shared by both clients.

Types, default values and which `details` payload a type takes come from
`rules.RULES` (the schema); this module only maps friendly parameters onto
them. Every event gets an event_id and occurred_at here, so a resend of the
same event is deduplicated by the server.
"""

from __future__ import annotations

import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import datetime
from typing import Generic, TypedDict, TypeVar, Unpack, cast

from google.protobuf.timestamp_pb2 import Timestamp

from interactions_client.rules import CUSTOM, STANDARD, TypeRule
from interactions_client.v1.event_pb2 import Event, EventType

R = TypeVar("R")


def new_event_id() -> str:
    """A fresh UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits.

    Time-ordered ids land at the end of the server's dedup index (user_id,
    event_id) instead of anywhere in it, which keeps inserts cheap as the log
    grows (docs/performance.md). Any UUID is accepted; this is the default.
    """
    value = (time.time_ns() // 1_000_000 & (1 << 48) - 1) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    return str(uuid.UUID(int=value))


class EventOptions(TypedDict, total=False):
    """Keyword options every typed method takes."""

    session_id: str | None
    attributes: Mapping[str, str] | None
    occurred_at: datetime | None  # timezone-aware; now when absent
    event_id: str | None  # a UUID; a fresh new_event_id() when absent


class SessionEventOptions(TypedDict, total=False):
    """Options of the session-tracker types, whose session_id is a parameter."""

    attributes: Mapping[str, str] | None
    occurred_at: datetime | None
    event_id: str | None


def timestamp(moment: datetime | None = None) -> Timestamp:
    """`moment` (timezone-aware) or now as a protobuf Timestamp."""
    ts = Timestamp()
    if moment is None:
        ts.FromNanoseconds(time.time_ns())
    elif moment.tzinfo is None:
        # Protobuf would read a naive datetime as UTC; a naive local time is a bug waiting to happen.
        raise ValueError("occurred_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
    else:
        ts.FromDatetime(moment)
    return ts


def new_event(
    type_name: str,
    user_id: str,
    *,
    product_id: str | None = None,
    value: int | None = None,
    details: Mapping[str, object] | None = None,
    session_id: str | None = None,
    attributes: Mapping[str, str] | None = None,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
) -> Event:
    """An event of a seed type (by stored name, e.g. "add_to_cart") or, for any
    other lower_snake name, a custom event of that name.

    `value` left as None means the type's default event_value. `details` are
    fields of the payload the type takes (e.g. {"query": "laptop"} for search).
    """
    rule = STANDARD.get(type_name, CUSTOM)
    event = Event(
        event_id=event_id or new_event_id(),
        event_type=cast(EventType.ValueType, rule.event_type),
        user_id=user_id,
        occurred_at=timestamp(occurred_at),
    )
    if rule is CUSTOM:
        event.custom_type = type_name
    if product_id is not None:
        event.product_id = product_id
    if session_id is not None:
        event.session_id = session_id
    if value is not None:
        event.event_value = value
    if attributes:
        event.attributes.update(attributes)
    if details is not None:
        _set_details(event, rule, details)
    return event


def _set_details(event: Event, rule: TypeRule, details: Mapping[str, object]) -> None:
    if rule.details is None:
        raise ValueError(f"{rule.name} events take no details")
    payload = getattr(event, rule.details)
    payload.SetInParent()  # present even when every field is empty
    for name, value in details.items():
        if value is None:
            continue
        if name not in payload.DESCRIPTOR.fields_by_name:
            raise ValueError(f"{rule.name} details have no field {name!r}")
        setattr(payload, name, value)


class EventMethods(ABC, Generic[R]):
    """The typed methods. `R` is what logging one event returns: a coroutine for
    the asyncio client, the result itself for the synchronous one."""

    @abstractmethod
    def _submit(self, event: Event) -> R:
        """Logs one built event."""

    # Core types.

    def view(self, user_id: str, product_id: str, **options: Unpack[EventOptions]) -> R:
        return self._submit(new_event("view", user_id, product_id=product_id, **options))

    def click(self, user_id: str, product_id: str, **options: Unpack[EventOptions]) -> R:
        return self._submit(new_event("click", user_id, product_id=product_id, **options))

    def add_to_cart(self, user_id: str, product_id: str, quantity: int = 1, **options: Unpack[EventOptions]) -> R:
        return self._submit(new_event("add_to_cart", user_id, product_id=product_id, value=quantity, **options))

    def remove_from_cart(self, user_id: str, product_id: str, quantity: int, **options: Unpack[EventOptions]) -> R:
        """Removes `quantity` items; 0 removes the whole line."""
        return self._submit(new_event("remove_from_cart", user_id, product_id=product_id, value=quantity, **options))

    def update_cart_quantity(self, user_id: str, product_id: str, quantity: int, **options: Unpack[EventOptions]) -> R:
        """Sets the line's quantity; 0 removes the line."""
        return self._submit(
            new_event("update_cart_quantity", user_id, product_id=product_id, value=quantity, **options)
        )

    def purchase(self, user_id: str, product_id: str, **options: Unpack[EventOptions]) -> R:
        """One purchase of the product (event_value is always 1; put a price in attributes)."""
        return self._submit(new_event("purchase", user_id, product_id=product_id, **options))

    def wishlist_add(self, user_id: str, product_id: str, **options: Unpack[EventOptions]) -> R:
        """A `wishlist` event with event_value 1."""
        return self._submit(new_event("wishlist", user_id, product_id=product_id, value=1, **options))

    def wishlist_remove(self, user_id: str, product_id: str, **options: Unpack[EventOptions]) -> R:
        """A `wishlist` event with event_value 0."""
        return self._submit(new_event("wishlist", user_id, product_id=product_id, value=0, **options))

    def review(self, user_id: str, product_id: str, stars: int, **options: Unpack[EventOptions]) -> R:
        return self._submit(new_event("review", user_id, product_id=product_id, value=stars, **options))

    def search(self, user_id: str, query: str, product_id: str | None = None, **options: Unpack[EventOptions]) -> R:
        return self._submit(new_event("search", user_id, product_id=product_id, details={"query": query}, **options))

    # Session-tracker types: session_id is required.

    def page_view(
        self,
        user_id: str,
        session_id: str,
        page_path: str,
        referrer: str | None = None,
        product_id: str | None = None,
        **options: Unpack[SessionEventOptions],
    ) -> R:
        details = {"page_path": page_path, "referrer": referrer}
        return self._submit(
            new_event("page_view", user_id, session_id=session_id, product_id=product_id, details=details, **options)
        )

    def product_view(
        self,
        user_id: str,
        session_id: str,
        product_id: str,
        product_name: str | None = None,
        **options: Unpack[SessionEventOptions],
    ) -> R:
        details = {"product_name": product_name}
        return self._submit(
            new_event("product_view", user_id, session_id=session_id, product_id=product_id, details=details, **options)
        )

    def cart_add(
        self, user_id: str, session_id: str, product_id: str, quantity: int = 1, **options: Unpack[SessionEventOptions]
    ) -> R:
        return self._cart_action("cart_add", "add", user_id, session_id, product_id, quantity, options)

    def cart_remove(
        self, user_id: str, session_id: str, product_id: str, quantity: int = 1, **options: Unpack[SessionEventOptions]
    ) -> R:
        return self._cart_action("cart_remove", "remove", user_id, session_id, product_id, quantity, options)

    def cart_update(
        self, user_id: str, session_id: str, product_id: str, quantity: int, **options: Unpack[SessionEventOptions]
    ) -> R:
        return self._cart_action("cart_update", "update", user_id, session_id, product_id, quantity, options)

    def session_wishlist_add(
        self, user_id: str, session_id: str, product_id: str, **options: Unpack[SessionEventOptions]
    ) -> R:
        """The session tracker's `wishlist_add` (no state sync; see wishlist_add for that)."""
        details = {"action": "add"}
        return self._submit(
            new_event("wishlist_add", user_id, session_id=session_id, product_id=product_id, details=details, **options)
        )

    def session_wishlist_remove(
        self, user_id: str, session_id: str, product_id: str, **options: Unpack[SessionEventOptions]
    ) -> R:
        """The session tracker's `wishlist_remove` (no state sync; see wishlist_remove for that)."""
        details = {"action": "remove"}
        return self._submit(
            new_event(
                "wishlist_remove", user_id, session_id=session_id, product_id=product_id, details=details, **options
            )
        )

    # Authentication types.

    def login(self, user_id: str, anonymous_id: str | None = None, **options: Unpack[EventOptions]) -> R:
        """`anonymous_id`: the id the user's events carried before logging in (a
        guest's cookie); the login links it to `user_id` (IdentityService)."""
        details = None if anonymous_id is None else {"anonymous_id": anonymous_id}
        return self._submit(new_event("login", user_id, details=details, **options))

    def logout(self, user_id: str, **options: Unpack[EventOptions]) -> R:
        return self._submit(new_event("logout", user_id, **options))

    def custom(
        self,
        user_id: str,
        name: str,
        *,
        product_id: str | None = None,
        value: int | None = None,
        **options: Unpack[EventOptions],
    ) -> R:
        """An event outside the catalog, stored under `name` (lower snake case, not a seed name)."""
        if name in STANDARD:
            raise ValueError(f"{name!r} is a standard type; use its own method")
        return self._submit(new_event(name, user_id, product_id=product_id, value=value, **options))

    def _cart_action(
        self,
        type_name: str,
        action: str,
        user_id: str,
        session_id: str,
        product_id: str,
        quantity: int,
        options: SessionEventOptions,
    ) -> R:
        details = {"quantity": quantity, "action": action}
        return self._submit(
            new_event(type_name, user_id, session_id=session_id, product_id=product_id, details=details, **options)
        )


def with_event_id(event: Event) -> Event:
    """`event`, or a copy with a fresh event_id when it has none.

    Without an id the server assigns one per attempt, so a retried write could
    be stored twice. The caller's message is not changed: it may be a template.
    """
    if event.event_id:
        return event
    copy = Event()
    copy.CopyFrom(event)
    copy.event_id = new_event_id()
    return copy
