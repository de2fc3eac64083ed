"""Client of the Interactions service: generated stubs (``interactions_client.v1``),
the rule catalog (``rules``) and event validation (``validation``)."""

from interactions_client.rules import RULES, STANDARD, TypeRule
from interactions_client.v1.event_pb2 import Event, EventType, FieldViolation
from interactions_client.validation import validate

__all__ = ["RULES", "STANDARD", "Event", "EventType", "FieldViolation", "TypeRule", "validate"]
