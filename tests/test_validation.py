"""validate(): every type's valid event passes; every rule and bound, broken,
is reported on the right field, all violations at once."""

from __future__ import annotations

import time

import pytest

from interactions_client import limits
from interactions_client.rules import RULES, STANDARD
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_client.validation import validate
from tests.events import ALL_TYPES, valid_event

T = EventType


def fields(event: Event) -> list[str]:
    return [v.field for v in validate(event)]


@pytest.mark.parametrize("event_type", ALL_TYPES, ids=lambda t: RULES[t].name)
def test_valid_event_of_every_type_passes(event_type: int) -> None:
    assert validate(valid_event(event_type)) == []


@pytest.mark.parametrize("event_type", ALL_TYPES, ids=lambda t: RULES[t].name)
def test_blank_user_id_is_rejected(event_type: int) -> None:
    assert fields(valid_event(event_type, user_id="")) == ["user_id"]
    assert fields(valid_event(event_type, user_id="   ")) == ["user_id"]


@pytest.mark.parametrize("event_type", [t for t in ALL_TYPES if RULES[t].product_id == 1], ids=lambda t: RULES[t].name)
def test_product_id_required(event_type: int) -> None:
    assert fields(valid_event(event_type, product_id="")) == ["product_id"]


@pytest.mark.parametrize("event_type", [T.EVENT_TYPE_LOGIN, T.EVENT_TYPE_LOGOUT])
def test_login_and_logout_reject_a_product_id(event_type: int) -> None:
    violations = validate(valid_event(event_type, product_id="p1"))
    assert [(v.field, "not allowed" in v.description) for v in violations] == [("product_id", True)]


@pytest.mark.parametrize("event_type", [T.EVENT_TYPE_SEARCH, T.EVENT_TYPE_PAGE_VIEW, T.EVENT_TYPE_CUSTOM])
def test_product_id_optional(event_type: int) -> None:
    assert validate(valid_event(event_type, product_id="")) == []


@pytest.mark.parametrize("event_type", [t for t in ALL_TYPES if RULES[t].session_required], ids=lambda t: RULES[t].name)
def test_session_tracker_types_require_session_id(event_type: int) -> None:
    assert 10 <= event_type <= 16
    assert fields(valid_event(event_type, session_id="")) == ["session_id"]


def test_session_required_exactly_for_types_10_to_16() -> None:
    assert sorted(t for t in ALL_TYPES if RULES[t].session_required) == list(range(10, 17))


# (type, good values, bad values) per value rule of the seed.
VALUE_CASES = [
    (T.EVENT_TYPE_VIEW, [1], [0, 2, -1]),
    (T.EVENT_TYPE_CLICK, [1], [0, 5]),
    (T.EVENT_TYPE_ADD_TO_CART, [1, 2, limits.MAX_QUANTITY], [0, -1, limits.MAX_QUANTITY + 1]),
    (T.EVENT_TYPE_REMOVE_FROM_CART, [0, 1, 7], [-1, limits.MAX_QUANTITY + 1]),
    (T.EVENT_TYPE_UPDATE_CART_QUANTITY, [0, 3], [-1, limits.MAX_QUANTITY + 1]),
    (T.EVENT_TYPE_PURCHASE, [1], [0, 1999]),
    (T.EVENT_TYPE_WISHLIST, [0, 1], [2, -1]),
    (T.EVENT_TYPE_REVIEW, [1, 3, 5], [0, 6]),
    (T.EVENT_TYPE_SEARCH, [1], [2]),
    (T.EVENT_TYPE_CART_ADD, [1], [2]),
    (T.EVENT_TYPE_LOGIN, [1], [0]),
    (T.EVENT_TYPE_CUSTOM, [-5, 0, 10**12], []),
]


@pytest.mark.parametrize(("event_type", "good", "bad"), VALUE_CASES, ids=lambda c: str(c))
def test_event_value_rules(event_type: int, good: list[int], bad: list[int]) -> None:
    for value in good:
        assert validate(valid_event(event_type, event_value=value)) == [], value
    for value in bad:
        assert fields(valid_event(event_type, event_value=value)) == ["event_value"], value


def test_purchase_value_message_says_price_does_not_belong() -> None:
    [violation] = validate(valid_event(T.EVENT_TYPE_PURCHASE, event_value=2499))
    assert violation.field == "event_value"
    assert "price does not belong in event_value" in violation.description


@pytest.mark.parametrize("name", ["update_cart_quantity", "wishlist", "review"])
def test_value_required_where_it_carries_meaning(name: str) -> None:
    assert fields(valid_event(STANDARD[name].event_type, event_value=None)) == ["event_value"]


@pytest.mark.parametrize("name", ["view", "add_to_cart", "remove_from_cart", "purchase", "login"])
def test_value_defaults_where_the_seed_gives_one(name: str) -> None:
    assert validate(valid_event(STANDARD[name].event_type, event_value=None)) == []


def test_wishlist_zero_is_a_value_not_absence() -> None:
    event = valid_event(T.EVENT_TYPE_WISHLIST, event_value=0)
    assert event.HasField("event_value")
    assert validate(event) == []


def test_search_requires_a_non_blank_query() -> None:
    assert fields(valid_event(T.EVENT_TYPE_SEARCH, search=None)) == ["search"]
    assert fields(valid_event(T.EVENT_TYPE_SEARCH, search={"query": ""})) == ["search.query"]
    assert fields(valid_event(T.EVENT_TYPE_SEARCH, search={"query": "  "})) == ["search.query"]
    too_long = "q" * (limits.MAX_QUERY_LENGTH + 1)
    assert fields(valid_event(T.EVENT_TYPE_SEARCH, search={"query": too_long})) == ["search.query"]


def test_details_payload_must_match_the_type() -> None:
    assert fields(valid_event(T.EVENT_TYPE_VIEW, search={"query": "x"})) == ["search"]
    assert fields(valid_event(T.EVENT_TYPE_PAGE_VIEW, cart_action={"quantity": 1})) == ["cart_action"]


def test_details_payload_optional_for_session_types() -> None:
    assert validate(valid_event(T.EVENT_TYPE_PAGE_VIEW, page_view={"page_path": "/a"})) == []
    assert validate(valid_event(T.EVENT_TYPE_CART_ADD, cart_action={"quantity": 2, "action": "add"})) == []
    assert validate(valid_event(T.EVENT_TYPE_WISHLIST_ADD, wishlist_action={"action": "add"})) == []
    assert validate(valid_event(T.EVENT_TYPE_PRODUCT_VIEW, product_view={"product_name": "X"})) == []


def test_details_bounds() -> None:
    long_url = "/" * (limits.MAX_URL_LENGTH + 1)
    assert fields(valid_event(T.EVENT_TYPE_PAGE_VIEW, page_view={"page_path": long_url})) == ["page_view.page_path"]
    assert fields(valid_event(T.EVENT_TYPE_PAGE_VIEW, page_view={"referrer": long_url})) == ["page_view.referrer"]
    big = limits.MAX_QUANTITY + 1
    assert fields(valid_event(T.EVENT_TYPE_CART_ADD, cart_action={"quantity": big})) == ["cart_action.quantity"]


def test_ids_are_bounded_and_event_id_is_a_uuid() -> None:
    long_id = "x" * (limits.MAX_ID_LENGTH + 1)
    assert fields(valid_event(T.EVENT_TYPE_VIEW, user_id=long_id)) == ["user_id"]
    assert fields(valid_event(T.EVENT_TYPE_VIEW, product_id=long_id)) == ["product_id"]
    assert fields(valid_event(T.EVENT_TYPE_PAGE_VIEW, session_id=long_id)) == ["session_id"]
    assert fields(valid_event(T.EVENT_TYPE_VIEW, event_id="not-a-uuid")) == ["event_id"]
    assert validate(valid_event(T.EVENT_TYPE_VIEW, event_id="")) == []  # the server assigns one
    assert fields(valid_event(T.EVENT_TYPE_VIEW, product_id="p\x00")) == ["product_id"]


def test_unknown_and_unspecified_types_are_rejected() -> None:
    assert fields(Event(user_id="u1", product_id="p1")) == ["event_type"]
    assert fields(Event(user_id="u1", event_type=99)) == ["event_type"]  # type: ignore[arg-type]


def test_custom_type_rules() -> None:
    custom = T.EVENT_TYPE_CUSTOM
    assert fields(valid_event(custom, custom_type="")) == ["custom_type"]
    assert fields(valid_event(custom, custom_type="GiftCard")) == ["custom_type"]
    assert fields(valid_event(custom, custom_type="a" * (limits.MAX_CUSTOM_TYPE_LENGTH + 1))) == ["custom_type"]
    [violation] = validate(valid_event(custom, custom_type="add_to_cart"))
    assert violation.field == "custom_type"
    assert "standard type" in violation.description
    assert fields(valid_event(T.EVENT_TYPE_VIEW, custom_type="x")) == ["custom_type"]


def test_occurred_at_bounds() -> None:
    now = time.time()
    event = valid_event(T.EVENT_TYPE_VIEW)
    event.occurred_at.seconds = int(now) + limits.MAX_FUTURE_SECONDS - 5
    assert validate(event, now=now) == []
    event.occurred_at.seconds = int(now) + limits.MAX_FUTURE_SECONDS + 60
    assert fields(event) == ["occurred_at"]
    event.occurred_at.seconds = -1
    assert fields(event) == ["occurred_at"]


def test_attribute_bounds() -> None:
    event = valid_event(T.EVENT_TYPE_VIEW)
    event.attributes.update({f"k{i}": "v" for i in range(limits.MAX_ATTRIBUTES)})
    assert validate(event) == []
    event.attributes["one_too_many"] = "v"
    assert fields(event) == ["attributes"]

    event = valid_event(T.EVENT_TYPE_VIEW)
    event.attributes["k" * (limits.MAX_ATTRIBUTE_KEY_LENGTH + 1)] = "v"
    event.attributes["long"] = "v" * (limits.MAX_ATTRIBUTE_VALUE_LENGTH + 1)
    event.attributes[""] = "v"
    assert sorted(fields(event)) == sorted(
        [f"attributes[{'k' * limits.MAX_ATTRIBUTE_KEY_LENGTH}]", "attributes[long]", "attributes[]"]
    )


def test_every_violation_is_reported_not_just_the_first() -> None:
    event = Event(event_type=T.EVENT_TYPE_WISHLIST, user_id="", event_id="nope", custom_type="x", search={"query": "q"})
    assert sorted(fields(event)) == ["custom_type", "event_id", "event_value", "product_id", "search", "user_id"]
