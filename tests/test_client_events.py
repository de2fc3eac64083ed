"""Client pieces that need no server: the typed event builders (one per seed
type, derived from the rule catalog), event ids, status-detail decoding and
the channel defaults."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from interactions_client import channel
from interactions_client.client import InteractionsClient
from interactions_client.events import EventMethods, new_event, with_event_id
from interactions_client.rpc_protos import Violation, bad_request_violations, encode_bad_request_status
from interactions_client.rules import CUSTOM, RULES, STANDARD
from interactions_client.v1.event_pb2 import Event, EventType
from interactions_client.validation import validate


class Recorder(EventMethods[Event]):
    """The typed methods, returning the event they would log."""

    def _submit(self, event: Event) -> Event:
        return event


# method, positional args, expected (stored type name, event_value or None for the default, details or None)
CASES: list[tuple[str, tuple[Any, ...], tuple[str, int | None, dict[str, Any] | None]]] = [
    ("view", ("u1", "p1"), ("view", None, None)),
    ("click", ("u1", "p1"), ("click", None, None)),
    ("add_to_cart", ("u1", "p1", 2), ("add_to_cart", 2, None)),
    ("remove_from_cart", ("u1", "p1", 0), ("remove_from_cart", 0, None)),
    ("update_cart_quantity", ("u1", "p1", 3), ("update_cart_quantity", 3, None)),
    ("purchase", ("u1", "p1"), ("purchase", None, None)),
    ("wishlist_add", ("u1", "p1"), ("wishlist", 1, None)),
    ("wishlist_remove", ("u1", "p1"), ("wishlist", 0, None)),
    ("review", ("u1", "p1", 5), ("review", 5, None)),
    ("search", ("u1", "laptop"), ("search", None, {"query": "laptop"})),
    (
        "page_view",
        ("u1", "s1", "/deals", "https://ex.com/"),
        ("page_view", None, {"page_path": "/deals", "referrer": "https://ex.com/"}),
    ),
    ("product_view", ("u1", "s1", "p1", "Laptop 14"), ("product_view", None, {"product_name": "Laptop 14"})),
    ("cart_add", ("u1", "s1", "p1", 2), ("cart_add", None, {"quantity": 2, "action": "add"})),
    ("cart_remove", ("u1", "s1", "p1"), ("cart_remove", None, {"quantity": 1, "action": "remove"})),
    ("cart_update", ("u1", "s1", "p1", 4), ("cart_update", None, {"quantity": 4, "action": "update"})),
    ("session_wishlist_add", ("u1", "s1", "p1"), ("wishlist_add", None, {"action": "add"})),
    ("session_wishlist_remove", ("u1", "s1", "p1"), ("wishlist_remove", None, {"action": "remove"})),
    ("login", ("u1",), ("login", None, None)),
    ("logout", ("u1",), ("logout", None, None)),
]


def test_every_seed_type_has_a_typed_method() -> None:
    assert {expected[0] for _, _, expected in CASES} == set(STANDARD)


@pytest.mark.parametrize(("method", "args", "expected"), CASES, ids=[c[0] for c in CASES])
def test_typed_method_builds_a_valid_event_of_its_type(
    method: str, args: tuple[Any, ...], expected: tuple[str, int | None, dict[str, Any] | None]
) -> None:
    type_name, value, details = expected
    before = time.time()
    event = getattr(Recorder(), method)(*args)
    rule = STANDARD[type_name]

    assert validate(event) == []
    assert event.event_type == rule.event_type
    assert event.user_id == "u1"
    assert uuid.UUID(event.event_id).version == 7  # time-ordered new_event_id()
    assert before - 1 <= event.occurred_at.ToNanoseconds() / 1e9 <= time.time() + 1
    if value is None:
        assert not event.HasField("event_value")  # the type's default applies
    else:
        assert event.HasField("event_value") and event.event_value == value
    member = event.WhichOneof("details")
    if details is None:
        assert member is None
    else:
        assert member == rule.details
        payload = getattr(event, member)
        assert {f.name: v for f, v in payload.ListFields()} == details
    if rule.session_required:
        assert event.session_id == "s1"


def test_product_ids_go_where_the_rules_want_them() -> None:
    recorder = Recorder()
    assert recorder.login("u1").product_id == ""
    assert recorder.search("u1", "laptop").product_id == ""
    assert recorder.search("u1", "laptop", "p9").product_id == "p9"
    assert recorder.page_view("u1", "s1", "/p/9", product_id="p9").product_id == "p9"


def test_keyword_options_are_applied() -> None:
    at = datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    event = Recorder().add_to_cart(
        "u1",
        "p1",
        2,
        session_id="s9",
        attributes={"price": "9.99"},
        occurred_at=at,
        event_id="0" * 8 + "-0000-4000-8000-" + "0" * 12,
    )
    assert event.session_id == "s9"
    assert dict(event.attributes) == {"price": "9.99"}
    assert event.occurred_at.ToDatetime(tzinfo=UTC) == at
    assert event.event_id == "00000000-0000-4000-8000-000000000000"


def test_each_call_gets_a_new_event_id() -> None:
    recorder = Recorder()
    assert recorder.view("u1", "p1").event_id != recorder.view("u1", "p1").event_id


def test_naive_occurred_at_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Recorder().view("u1", "p1", occurred_at=datetime(2026, 1, 1))


def test_custom_events() -> None:
    event = Recorder().custom("u1", "gift_card_redeemed", value=25, attributes={"code": "X"})
    assert event.event_type == CUSTOM.event_type
    assert event.custom_type == "gift_card_redeemed"
    assert event.event_value == 25
    assert validate(event) == []
    with pytest.raises(ValueError, match="standard type"):
        Recorder().custom("u1", "view")


def test_new_event_checks_details_against_the_rules() -> None:
    with pytest.raises(ValueError, match="take no details"):
        new_event("view", "u1", product_id="p1", details={"query": "x"})
    with pytest.raises(ValueError, match="no field 'page_path'"):
        new_event("search", "u1", details={"page_path": "/x"})
    # Every type that takes a payload gets one, present even when empty.
    for rule in RULES.values():
        if rule.details:
            assert new_event(rule.name, "u1", details={}).WhichOneof("details") == rule.details


def test_with_event_id_copies_instead_of_changing_the_callers_event() -> None:
    template = Event(event_type=EventType.EVENT_TYPE_VIEW, user_id="u1", product_id="p1")
    first, second = with_event_id(template), with_event_id(template)
    assert template.event_id == ""
    assert first.event_id and second.event_id and first.event_id != second.event_id
    assert first.product_id == "p1"
    assert with_event_id(first) is first


def official_bad_request_status(violations: list[tuple[str, str]]) -> bytes:
    """google.rpc.Status built with googleapis-common-protos, as a server using grpcio-status sends it."""
    bad_request = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="invalid event")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="OTHER"))  # details of other types are skipped
    status.details.add().Pack(bad_request)
    return bytes(status.SerializeToString())


def test_status_details_decode_without_googleapis_common_protos() -> None:
    violations = [("event_value", "is a star rating from 1 to 5"), ("product_id", "is required")]
    assert bad_request_violations(official_bad_request_status(violations)) == [Violation(*v) for v in violations]
    assert bad_request_violations(b"\xff\xff garbage") == []
    assert bad_request_violations(b"") == []


def test_encoded_status_reads_back_with_the_official_messages() -> None:
    data = encode_bad_request_status(3, "invalid event", [Violation("user_id", "is required")])
    status = status_pb2.Status.FromString(data)
    bad_request = error_details_pb2.BadRequest()
    assert status.code == 3 and status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [("user_id", "is required")]


def test_channel_defaults() -> None:
    options = dict(channel.channel_options())
    assert {k: options[k] for k, _ in channel.KEEPALIVE_OPTIONS} == {
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
    }
    assert options["grpc.enable_retries"] == 1
    (method_config,) = json.loads(options["grpc.service_config"])["methodConfig"]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "ABORTED", "CANCELLED"]
    assert {"service": "interactions.v1.InteractionService", "method": "LogEvent"} in method_config["name"]
    # StreamEvents is not retried by the channel: the streamer resends itself.
    assert all(n.get("method") != "StreamEvents" for n in method_config["name"])


def test_channel_options_override_defaults() -> None:
    options = channel.channel_options([("grpc.keepalive_time_ms", 60_000), ("grpc.primary_user_agent", "x")])
    assert [v for k, v in options if k == "grpc.keepalive_time_ms"] == [60_000]
    assert ("grpc.primary_user_agent", "x") in options


def test_the_asyncio_client_must_be_made_in_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="inside a coroutine"):
        InteractionsClient("127.0.0.1:1")


def test_tls_config_needs_key_and_certificate_together() -> None:
    with pytest.raises(ValueError):
        channel.TlsConfig(certificate_chain=b"cert")
    channel.TlsConfig(root_certificates=b"roots").credentials()


def test_target_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(channel.TARGET_ENV, raising=False)
    assert channel.default_target() == "localhost:50051"
    monkeypatch.setenv(channel.TARGET_ENV, "interactions:443")
    assert channel.default_target() == "interactions:443"


def test_new_event_ids_are_time_ordered_uuid7() -> None:
    from interactions_client.events import new_event_id

    first = new_event_id()
    time.sleep(0.002)
    later = [new_event_id() for _ in range(100)]
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in [first, *later])
    assert all(first < i for i in later)  # the millisecond prefix orders them
    assert len(set(later)) == 100
    assert validate(new_event("view", "u1", product_id="p1")) == []
