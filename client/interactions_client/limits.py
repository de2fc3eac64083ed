"""Bounds the service enforces beyond the per-type rules, read once from the
schema: the `bounds` file option of protos/interactions/v1/event.proto is the
only place the numbers are written (README's table is checked against them)."""

from __future__ import annotations

from interactions_client.v1 import event_pb2, rules_pb2


def _read_bounds() -> rules_pb2.Bounds:
    options = event_pb2.DESCRIPTOR.GetOptions()
    if not options.HasExtension(rules_pb2.bounds):
        raise RuntimeError("event.proto declares no (interactions.v1.bounds) option")
    bounds: rules_pb2.Bounds = options.Extensions[rules_pb2.bounds]
    unset = [f.name for f in bounds.DESCRIPTOR.fields if getattr(bounds, f.name) <= 0]
    if unset:
        raise RuntimeError(f"event.proto's bounds leave {', '.join(unset)} unset")
    return bounds


BOUNDS = _read_bounds()
"""The bounds as the schema message (what ListEventTypes returns)."""

MAX_BATCH_EVENTS = BOUNDS.max_batch_events
MAX_ID_LENGTH = BOUNDS.max_id_length
MAX_CUSTOM_TYPE_LENGTH = BOUNDS.max_custom_type_length
MAX_QUANTITY = BOUNDS.max_quantity
MAX_FUTURE_SECONDS = BOUNDS.max_future_seconds
MAX_QUERY_LENGTH = BOUNDS.max_query_length
MAX_URL_LENGTH = BOUNDS.max_url_length
MAX_TEXT_LENGTH = BOUNDS.max_text_length  # product_name, action
MAX_ATTRIBUTES = BOUNDS.max_attributes
MAX_ATTRIBUTE_KEY_LENGTH = BOUNDS.max_attribute_key_length
MAX_ATTRIBUTE_VALUE_LENGTH = BOUNDS.max_attribute_value_length
