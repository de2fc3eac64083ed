"""The JSON text stored for an event's details and attributes: byte for byte
what json.dumps writes (default separators, ASCII escapes), without its
per-call overhead. The shapes are read once from the schema."""

from __future__ import annotations

import json
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii
from typing import NamedTuple

from google.protobuf.descriptor import FieldDescriptor

from interactions_client.v1.event_pb2 import Event

_INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


class _Field(NamedTuple):
    name: str
    key: str  # '"name": '
    optional: bool  # has presence: written only when set
    text: bool  # a string (else an integer)


class _Shape(NamedTuple):
    prefix: str  # '{"member": {'
    fields: tuple[_Field, ...]
    generic: bool  # a field of a type this module does not write: json.dumps does


def _shape(member: FieldDescriptor) -> _Shape:
    subs = member.message_type.fields  # type: ignore[union-attr]
    return _Shape(
        "{" + encode_basestring_ascii(member.name) + ": {",
        tuple(
            _Field(sub.name, encode_basestring_ascii(sub.name) + ": ", sub.has_presence, sub.type == sub.TYPE_STRING)
            for sub in subs
        ),
        any(sub.type != FieldDescriptor.TYPE_STRING and sub.type not in _INTEGER_TYPES for sub in subs),
    )


_SHAPES: dict[str, _Shape] = {f.name: _shape(f) for f in Event.DESCRIPTOR.oneofs_by_name["details"].fields}


def details_json(event: Event, member: str) -> str:
    """{"member": {field: value, ...}} of the set `details` member; an optional field only when set."""
    prefix, fields, generic = _SHAPES[member]
    payload = getattr(event, member)
    if generic:
        return json.dumps(
            {member: {f.name: getattr(payload, f.name) for f in fields if not f.optional or payload.HasField(f.name)}}
        )
    parts = []
    for name, key, optional, text in fields:
        if optional and not payload.HasField(name):
            continue
        value = getattr(payload, name)
        parts.append(key + (encode_basestring_ascii(value) if text else int.__repr__(value)))
    return prefix + ", ".join(parts) + "}}"


def attributes_json(attributes: Mapping[str, str]) -> str:
    """The attributes map as a JSON object, in the map's order."""
    return (
        "{"
        + ", ".join([encode_basestring_ascii(k) + ": " + encode_basestring_ascii(v) for k, v in attributes.items()])
        + "}"
    )
