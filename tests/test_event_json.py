"""The stored JSON of details and attributes is exactly what json.dumps writes."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from interactions_client.v1.event_pb2 import Event
from interactions_server.ingest import attributes_json, details_json

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


def by_json_dumps(event: Event, member: str) -> str:
    payload = getattr(event, member)
    return json.dumps(
        {
            member: {
                f.name: getattr(payload, f.name)
                for f in payload.DESCRIPTOR.fields
                if not f.has_presence or payload.HasField(f.name)
            }
        }
    )


@given(query=TEXT, count=st.none() | st.integers(0, 2**31 - 1), path=TEXT, referrer=TEXT)
def test_details_are_written_as_json_dumps_writes_them(query: str, count: int | None, path: str, referrer: str) -> None:
    search = Event()
    search.search.query = query
    if count is not None:
        search.search.result_count = count
    page = Event()
    page.page_view.page_path, page.page_view.referrer = path, referrer
    for event, member in ((search, "search"), (page, "page_view")):
        assert details_json(event, member) == by_json_dumps(event, member)
        assert json.loads(details_json(event, member))[member] is not None


def test_every_details_member_is_written_as_json_dumps_writes_it() -> None:
    for member in Event.DESCRIPTOR.oneofs_by_name["details"].fields:
        event = Event()
        getattr(event, member.name).SetInParent()  # every field at its default
        assert details_json(event, member.name) == by_json_dumps(event, member.name)
    event = Event()
    event.cart_action.quantity, event.cart_action.action = 3, 'add "one"'
    assert details_json(event, "cart_action") == by_json_dumps(event, "cart_action")


@given(st.dictionaries(TEXT, TEXT, max_size=5))
def test_attributes_are_written_as_json_dumps_writes_them(attributes: dict[str, str]) -> None:
    event = Event(attributes=attributes)
    assert attributes_json(event.attributes) == json.dumps(dict(event.attributes))
