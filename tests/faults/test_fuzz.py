"""Fault 4: fuzzing every RPC with hypothesis.

The RPCs are read from the service descriptors of
client/interactions_client/v1/*_pb2.py (a new service is covered without
touching this file), plus grpc.health.v1.Health and server reflection. Each
gets random bytes, random well-formed messages built from its request
descriptor (extreme strings, NULs, int64 edges, timestamps at and beyond the
edges, unknown enum values), and the write RPCs get near-valid Events with
one or two extreme fields.

Promise: never INTERNAL or UNKNOWN; nothing written for a rejected event (the
log holds exactly as many events as the answers counted accepted, less
those a forced PurgeEvents answered as removed, and no rejected event's key).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import pkgutil
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import interactions_client.v1
from interactions_client.v1 import admin_service_pb2 as admin_pb
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event
from tests.events import ALL_TYPES, valid_event
from tests.faults.conftest import StartApp
from tests.faults.ledger import FORBIDDEN_CODES, OK, TracebackCatcher, report
from tests.faults.postgres import OwnPostgres

EXAMPLES = 400  # per hypothesis run; three runs


def services() -> list[ServiceDescriptor]:
    found = []
    for info in pkgutil.iter_modules(interactions_client.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"interactions_client.v1.{info.name}")
            found.extend(module.DESCRIPTOR.services_by_name.values())
    found.append(health_pb2.DESCRIPTOR.services_by_name["Health"])
    found.append(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
    return found


METHODS: list[MethodDescriptor] = [m for s in services() for m in s.methods]
WRITES = {"LogEvent", "LogEvents", "StreamEvents"}
WRITE_METHODS = [
    m
    for m in METHODS
    if m.containing_service.full_name == pb.DESCRIPTOR.services_by_name["InteractionService"].full_name
    and m.name in WRITES
]


PURGE = "/interactions.v1.AdminService/PurgeEvents"


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# --- values at the edges ----------------------------------------------------

NOW = 1_795_000_000
EXTREME_STRINGS = [
    "",
    " ",
    "\x00",
    "u\x00",
    "\x00" * 200,
    "\u202e\u200b",
    "😀" * 128,
    "😀" * 129,
    "x" * 129,
    "x" * 1025,
    "x" * 2049,
    "é" * 4000,
    "EVENT_TYPE_VIEW",
    "add_to_cart",
    "'; DROP TABLE events; --",
    "00000000-0000-0000-0000-000000000000",
    "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
]
strings = st.one_of(
    st.sampled_from(EXTREME_STRINGS),
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.uuids().map(str),
)
INT64_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 10_000, 10_001, 1_000, 1_001]
int64s = st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
int32s = st.one_of(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 1000, 1001]), st.integers(-(2**31), 2**31 - 1))
uint64s = st.one_of(st.sampled_from([0, 1, 2**64 - 1, 2**63]), st.integers(0, 2**64 - 1))
uint32s = st.one_of(st.sampled_from([0, 1, 2**32 - 1]), st.integers(0, 2**32 - 1))
TIMESTAMP_SECONDS = [
    -62_135_596_800,  # 0001-01-01, the smallest valid Timestamp
    253_402_300_799,  # 9999-12-31, the largest
    -62_135_596_801,
    253_402_300_800,
    2**63 - 1,
    -(2**63),
    -1,
    0,
    NOW,
    NOW + 10**6,
]
timestamps = st.builds(
    lambda s, n: {"seconds": s, "nanos": n},
    st.one_of(st.sampled_from(TIMESTAMP_SECONDS), st.integers(-(2**63), 2**63 - 1)),
    st.one_of(st.sampled_from([0, 999_999_999, -1, 10**9, -(2**31), 2**31 - 1]), st.integers(0, 999_999_999)),
)

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: strings,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT64: int64s,
    FieldDescriptor.TYPE_SINT64: int64s,
    FieldDescriptor.TYPE_SFIXED64: int64s,
    FieldDescriptor.TYPE_INT32: int32s,
    FieldDescriptor.TYPE_SINT32: int32s,
    FieldDescriptor.TYPE_SFIXED32: int32s,
    FieldDescriptor.TYPE_UINT64: uint64s,
    FieldDescriptor.TYPE_FIXED64: uint64s,
    FieldDescriptor.TYPE_UINT32: uint32s,
    FieldDescriptor.TYPE_FIXED32: uint32s,
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
}


def _value(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if f.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        if f.message_type.full_name == "google.protobuf.Timestamp":
            return timestamps.map(lambda t: message_factory.GetMessageClass(f.message_type)(**t))
        return messages(f.message_type, depth + 1)
    return _SCALARS[f.type]


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Random well-formed messages of `descriptor`, each field set or not."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            optional[f.name] = st.dictionaries(_value(key_f, depth), _value(value_f, depth), max_size=60)
        elif f.is_repeated:
            optional[f.name] = st.lists(_value(f, depth), max_size=4 if depth else 30)
        else:
            optional[f.name] = _value(f, depth)
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, values))


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        target = getattr(message, name, None)
        if isinstance(value, dict):
            target.update(value)  # a map
        elif isinstance(value, list):
            target.extend(value)
        elif isinstance(value, Message):
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


@st.composite
def near_valid_events(draw: st.DrawFn) -> Event:
    """A valid event of a random type with one or two fields set to an extreme value."""
    event = valid_event(draw(st.sampled_from(ALL_TYPES)), user_id=f"fz-{draw(st.integers(0, 20))}")
    random_event = draw(messages(Event.DESCRIPTOR, depth=1))
    for name in draw(st.lists(st.sampled_from([f.name for f in Event.DESCRIPTOR.fields]), min_size=1, max_size=2)):
        f = Event.DESCRIPTOR.fields_by_name[name]
        event.ClearField(name)
        if f.is_repeated:
            getattr(event, name).update(getattr(random_event, name))
        elif f.message_type is not None:
            getattr(event, name).CopyFrom(draw(_value(f, 1)))
        else:
            setattr(event, name, draw(_value(f, 1)))
    if draw(st.booleans()):
        event.event_id = str(uuid.uuid4())  # a fresh key: its fate is checked in the log
    return event


# --- calling ----------------------------------------------------------------


@dataclass
class Tally:
    codes: Counter[str] = field(default_factory=Counter)
    by_method: dict[str, Counter[str]] = field(default_factory=dict)
    accepted: int = 0  # events the answers counted as newly written
    purged: int = 0  # events the answers of forced purges counted as removed
    rejected_keys: set[tuple[str, str]] = field(default_factory=set)
    accepted_keys: set[tuple[str, str]] = field(default_factory=set)
    examples: dict[str, str] = field(default_factory=dict)  # a request per forbidden code
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self, method: MethodDescriptor, code: str, request: bytes | list[bytes]) -> None:
        with self.lock:
            self.codes[code] += 1
            self.by_method.setdefault(method.name, Counter())[code] += 1
            if code in FORBIDDEN_CODES:
                self.examples.setdefault(code, f"{path(method)} {request!r:.300}")


def invoke(channel: grpc.Channel, method: MethodDescriptor, requests: list[bytes], tally: Tally) -> list[bytes]:
    """Calls `method` with raw request bytes (one, or several for a request
    stream); returns the raw responses; tallies the status code."""
    name = path(method)
    responses: list[bytes] = []
    try:
        if not method.client_streaming and not method.server_streaming:
            responses.append(channel.unary_unary(name)(requests[0], timeout=10))
        elif not method.client_streaming:
            call = channel.unary_stream(name)(requests[0], timeout=10)
            try:  # a Watch streams forever: its first answer is enough
                responses.extend(itertools.islice(call, 1))
            finally:
                call.cancel()
        elif not method.server_streaming:
            responses.append(channel.stream_unary(name)(iter(requests), timeout=10))
        else:
            responses.extend(channel.stream_stream(name)(iter(requests), timeout=10))
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        if code != grpc.StatusCode.CANCELLED:
            tally.answered(method, code.name, requests)
        return responses
    tally.answered(method, OK, requests)
    return responses


def count_purged(method: MethodDescriptor, requests: list[bytes], responses: list[bytes], tally: Tally) -> None:
    """A forced PurgeEvents (a random request may be one) removed what it answers."""
    if path(method) == PURGE and responses and admin_pb.PurgeEventsRequest.FromString(requests[0]).force:
        tally.purged += admin_pb.PurgeEventsResponse.FromString(responses[0]).events


def count_writes(method: MethodDescriptor, requests: list[Message], responses: list[bytes], tally: Tally) -> None:
    """What the answers of a write RPC say was written, and which keys were rejected."""
    if method.name == "LogEvent":
        event = requests[0].event  # type: ignore[attr-defined]
        k = (event.user_id, event.event_id)
        if responses:
            answer = pb.LogEventResponse.FromString(responses[0])
            tally.accepted += not answer.duplicate
            tally.accepted_keys.add((event.user_id, answer.event_id))
        else:
            tally.rejected_keys.add(k)
        return
    answers: list[Any]
    if method.name == "LogEvents":
        answers = [pb.LogEventsResponse.FromString(r) for r in responses]
    else:
        answers = [pb.StreamEventsResponse.FromString(r) for r in responses]
    for request, answer in zip(requests, answers, strict=False):
        tally.accepted += answer.accepted_count
        rejected = {r.index for r in answer.rejected}
        for i, event in enumerate(request.events):  # type: ignore[attr-defined]
            (tally.rejected_keys if i in rejected else tally.accepted_keys).add((event.user_id, event.event_id))
    for request in requests[len(answers) :]:  # not answered: the call failed, nothing known
        for event in request.events:  # type: ignore[attr-defined]
            tally.rejected_keys.add((event.user_id, event.event_id))


def run(examples: int, strategy: st.SearchStrategy[Any], body: Callable[[Any], None]) -> None:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def property_test(example: Any) -> None:
        body(example)

    property_test()


async def test_fuzzing_every_rpc_never_gets_internal_or_unknown(
    postgres: OwnPostgres, start_app: StartApp, tracebacks: TracebackCatcher
) -> None:
    app = await start_app(postgres.url)
    tally = Tally()
    channel = grpc.insecure_channel(app.address)

    def raw_bytes(example: tuple[MethodDescriptor, list[bytes]]) -> None:
        method, requests = example
        responses = invoke(channel, method, requests, tally)
        # Random bytes on a write RPC may parse into events: what was written is counted.
        if method in WRITE_METHODS and (parsed := _parsed_prefix(method, requests)):
            count_writes(method, parsed, responses, tally)
        count_purged(method, requests, responses, tally)

    def well_formed(example: tuple[MethodDescriptor, list[Message]]) -> None:
        method, requests = example
        responses = invoke(channel, method, [r.SerializeToString() for r in requests], tally)
        if method in WRITE_METHODS:
            count_writes(method, requests, responses, tally)
        count_purged(method, [r.SerializeToString() for r in requests], responses, tally)

    def requests_of(method: MethodDescriptor) -> st.SearchStrategy[list[Message]]:
        one = messages(method.input_type)
        return st.lists(one, min_size=1, max_size=3) if method.client_streaming else one.map(lambda m: [m])

    def event_requests(method: MethodDescriptor) -> st.SearchStrategy[list[Message]]:
        events = st.lists(near_valid_events(), min_size=1, max_size=8)
        if method.name == "LogEvent":
            return near_valid_events().map(lambda e: [pb.LogEventRequest(event=e)])
        if method.name == "LogEvents":
            return events.map(lambda es: [pb.LogEventsRequest(events=es)])
        return st.lists(events, min_size=1, max_size=3).map(
            lambda batches: [pb.StreamEventsRequest(sequence=i, events=es) for i, es in enumerate(batches)]
        )

    try:
        await asyncio.to_thread(
            run,
            EXAMPLES,
            st.tuples(st.sampled_from(METHODS), st.lists(st.binary(max_size=300), min_size=1, max_size=3)),
            raw_bytes,
        )
        await asyncio.to_thread(
            run,
            EXAMPLES,
            st.sampled_from(METHODS).flatmap(lambda m: st.tuples(st.just(m), requests_of(m))),
            well_formed,
        )
        await asyncio.to_thread(
            run,
            EXAMPLES,
            st.sampled_from(WRITE_METHODS).flatmap(lambda m: st.tuples(st.just(m), event_requests(m))),
            well_formed,
        )
    finally:
        channel.close()

    logged = await log_keys(postgres.url)
    report(
        "fuzz", f"{sum(tally.codes.values())} calls on {len(METHODS)} RPCs; answers: {dict(tally.codes.most_common())}"
    )
    report("fuzz by RPC", "; ".join(f"{m}: {dict(c)}" for m, c in sorted(tally.by_method.items())))
    report("fuzz writes", f"{tally.accepted} events accepted, {tally.purged} purged, {len(logged)} in the log")
    assert not {c: tally.codes[c] for c in FORBIDDEN_CODES if tally.codes[c]}, tally.examples
    written_rejects = (tally.rejected_keys - tally.accepted_keys) & logged
    assert not written_rejects, f"rejected events were written: {sorted(written_rejects)[:3]}"
    assert len(logged) == tally.accepted - tally.purged, "the log must hold exactly the events answered as accepted"
    assert not tracebacks.records, f"tracebacks logged: {tracebacks.summary()}"


def _parsed_prefix(method: MethodDescriptor, requests: list[bytes]) -> list[Message]:
    """The requests that parse, up to the first that does not (where the server stops)."""
    cls = message_factory.GetMessageClass(method.input_type)
    parsed = []
    for request in requests:
        try:
            parsed.append(cls.FromString(request))
        except DecodeError:
            break
    return parsed


async def log_keys(database_url: str) -> set[tuple[str, str]]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT user_id, event_id::text FROM events")
    finally:
        await connection.close()
    return {(r[0], r[1]) for r in rows}
