"""The four shapes of a gRPC method handler, in one place.

grpc has one factory per shape (unary-unary, unary-stream, stream-unary,
stream-stream) and keeps a handler's behavior in the attribute of its
shape. grpc.aio dispatches on the shape, so an interceptor must return a
handler of the same shape as the one it wraps (`rewrapped`), and a service
is registered with the factory its method descriptor asks for (`register`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc._cython.cygrpc import ExecuteBatchError

Shape = tuple[bool, bool]  # (request streaming, response streaming)
# What an interceptor's intercept_service is given to find the next handler.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
_B = TypeVar("_B", bound=Callable[..., Any])

_FACTORIES: dict[Shape, Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
_ATTRIBUTES: dict[Shape, str] = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


class MalformedRequest:
    """Stands in for a request message whose bytes did not parse (bad UTF-8 in
    a string field, a truncated message): the StatusInterceptor turns it
    into INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


def lenient_parser(message_class: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    """A request deserializer that never raises (gRPC would answer UNKNOWN)."""

    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(str(exc))

    return parse


def shape(handler: grpc.RpcMethodHandler) -> Shape:
    return (bool(handler.request_streaming), bool(handler.response_streaming))


def behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function that handles the calls of `handler`."""
    function: Callable[..., Any] = getattr(handler, _ATTRIBUTES[shape(handler)])
    return function


def async_behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any] | None:
    """The behavior of `handler` when it is a coroutine or async generator
    function; None for a synchronous one (none here: gRPC runs it in an
    executor, and interceptors leave it as it is)."""
    function = behavior(handler)
    return function if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function) else None


def rewrapped(handler: grpc.RpcMethodHandler, new_behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of the same shape and (de)serializers as `handler`, calling `new_behavior`."""
    return _FACTORIES[shape(handler)](
        new_behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape that ends each call with `code`, its
    request never parsed (a refusal under overload costs little)."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return _FACTORIES[shape(handler)](
        refuse, request_deserializer=None, response_serializer=handler.response_serializer
    )


async def write_unless_gone(context: grpc.aio.ServicerContext, response: Any) -> bool:
    """Writes a response of a streaming call; False when the peer has gone
    (it cancelled, or its connection broke, while the write waited for flow
    control: gRPC fails the write). A yielded response that fails so is logged
    by gRPC as an error with a traceback; a written one is the caller's to end."""
    try:
        await context.write(response)
    except ExecuteBatchError:
        return False
    return True


_ENCODED = "_yields_encoded_responses"


def yields_encoded(behavior: _B) -> _B:
    """Marks a behavior whose responses are the bytes of their message,
    encoded already (a response assembled from parts encoded once for many
    calls, like a subscription's events): gRPC sends them as they are."""
    setattr(behavior, _ENCODED, True)
    return behavior


def _as_is(response: bytes) -> bytes:
    return response


def register(server: grpc.aio.Server, service: ServiceDescriptor, behaviors: Mapping[str, Callable[..., Any]]) -> None:
    """Registers the behaviors of `service`'s methods by name, like the
    generated add_*_to_server, except that a request that does not parse
    reaches its behavior as a MalformedRequest (and so INVALID_ARGUMENT)
    instead of failing inside gRPC as UNKNOWN, and that a behavior marked
    `yields_encoded` sends bytes. A method left out of `behaviors` is
    UNIMPLEMENTED."""
    handlers = {
        method.name: _FACTORIES[(method.client_streaming, method.server_streaming)](
            behaviors[method.name],
            request_deserializer=lenient_parser(message_factory.GetMessageClass(method.input_type)),
            response_serializer=_as_is
            if getattr(behaviors[method.name], _ENCODED, False)
            else message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
        for method in service.methods
        if method.name in behaviors
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
