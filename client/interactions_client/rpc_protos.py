"""The few google.rpc and grpc.health.v1 messages the client reads, without their packages.

`google.rpc.Status` / `BadRequest` ship with googleapis-common-protos and the
health messages with grpcio-health-checking; the client depends on grpcio and
protobuf only. The messages are declared here field for field (same numbers,
so the same wire format) in a private descriptor pool, which also keeps them
from clashing with those packages when a process imports both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

_F = descriptor_pb2.FieldDescriptorProto
_BAD_REQUEST_TYPE_URL = "type.googleapis.com/google.rpc.BadRequest"

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING
SERVING_STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _field(name: str, number: int, kind: int, *, type_name: str = "", repeated: bool = False) -> _F:
    label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    field = _F(name=name, number=number, type=kind, label=label)  # type: ignore[arg-type]
    if type_name:  # set only for message fields: an empty one still counts as set
        field.type_name = type_name
    return field


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)

    rpc = descriptor_pb2.FileDescriptorProto(
        name="interactions_client/google_rpc.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    status = rpc.message_type.add(name="Status")
    status.field.extend(
        [
            _field("code", 1, _F.TYPE_INT32),
            _field("message", 2, _F.TYPE_STRING),
            _field("details", 3, _F.TYPE_MESSAGE, type_name=".google.protobuf.Any", repeated=True),
        ]
    )
    bad_request = rpc.message_type.add(name="BadRequest")
    violation = bad_request.nested_type.add(name="FieldViolation")
    violation.field.extend([_field("field", 1, _F.TYPE_STRING), _field("description", 2, _F.TYPE_STRING)])
    bad_request.field.append(
        _field("field_violations", 1, _F.TYPE_MESSAGE, type_name=".google.rpc.BadRequest.FieldViolation", repeated=True)
    )
    pool.AddSerializedFile(rpc.SerializeToString())

    health = descriptor_pb2.FileDescriptorProto(
        name="interactions_client/grpc_health.proto", package="grpc.health.v1", syntax="proto3"
    )
    health.message_type.add(name="HealthCheckRequest").field.append(_field("service", 1, _F.TYPE_STRING))
    health.message_type.add(name="HealthCheckResponse").field.append(_field("status", 1, _F.TYPE_INT32))
    pool.AddSerializedFile(health.SerializeToString())
    return pool


_POOL = _build_pool()
# Typed Any: classes made at run time have no stubs, and these four are only read here.
_Status: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("google.rpc.Status"))
_BadRequest: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("google.rpc.BadRequest"))
_HealthCheckRequest: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
)
_HealthCheckResponse: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
)


class Violation(NamedTuple):
    """One problem with one field: ("event_value", "is a star rating from 1 to 5")."""

    field: str
    description: str


def bad_request_violations(status_details: bytes) -> list[Violation]:
    """The google.rpc.BadRequest field violations in serialized google.rpc.Status
    bytes (the `grpc-status-details-bin` trailer); [] when there are none."""
    try:
        status = _Status.FromString(status_details)
        out: list[Violation] = []
        for detail in status.details:
            if detail.type_url == _BAD_REQUEST_TYPE_URL:
                bad_request = _BadRequest.FromString(detail.value)
                out.extend(Violation(str(v.field), str(v.description)) for v in bad_request.field_violations)
        return out
    except DecodeError:
        return []  # a garbled trailer must not hide the status code it came with


def serialize_health_check_request(service: str) -> bytes:
    return bytes(_HealthCheckRequest(service=service).SerializeToString())


def parse_health_check_status(data: bytes) -> int:
    """The ServingStatus number of a serialized grpc.health.v1.HealthCheckResponse."""
    return int(_HealthCheckResponse.FromString(data).status)


def encode_bad_request_status(code: int, message: str, violations: list[Violation]) -> bytes:
    """Serialized google.rpc.Status carrying a BadRequest (for tests and fake servers)."""
    bad_request = _BadRequest()
    for field, description in violations:
        bad_request.field_violations.add(field=field, description=description)
    status = _Status(code=code, message=message)
    status.details.add(type_url=_BAD_REQUEST_TYPE_URL, value=bad_request.SerializeToString())
    return bytes(status.SerializeToString())
