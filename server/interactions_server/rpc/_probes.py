"""grpc.health.v1 and server reflection, registered so that a request whose
bytes do not parse is answered INVALID_ARGUMENT instead of failing inside
gRPC (which logs an ERROR traceback per request and answers UNKNOWN).

grpc's own helpers (add_HealthServicer_to_server, enable_server_reflection)
register the default deserializers; here the same servicers are registered
with the lenient parser (_handlers.py) and a check in front of each method.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from interactions_server.rpc import _handlers as handlers
from interactions_server.rpc._handlers import MalformedRequest

_MALFORMED = "the request is not a valid message"


async def _abort_if_malformed(request: object, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{_MALFORMED}: {request.error}")


async def _respond(result: Any, context: grpc.aio.ServicerContext) -> None:
    """Runs a streaming-response behavior: an async generator (reflection) or
    a coroutine that writes its responses itself (health's Watch)."""
    if inspect.isasyncgen(result):
        async for response in result:
            await context.write(response)
    else:
        await result


def _checked(method: MethodDescriptor, behavior: Callable[..., Any]) -> Callable[..., Any]:
    if method.client_streaming:

        async def parsed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for request in requests:
                await _abort_if_malformed(request, context)
                yield request

        if method.server_streaming:

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
                await _respond(behavior(parsed(requests, context), context), context)

            return stream_stream

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await behavior(parsed(requests, context), context)

        return stream_unary

    if method.server_streaming:

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            await _abort_if_malformed(request, context)
            await _respond(behavior(request, context), context)

        return unary_stream

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _abort_if_malformed(request, context)
        return await behavior(request, context)

    return unary_unary


def add_checked_servicer(
    server: grpc.aio.Server, servicer: object, service: ServiceDescriptor, generated_base: type
) -> None:
    """Registers the methods `servicer` implements (not those it inherits from
    its generated base, which raise NotImplementedError with a traceback;
    gRPC answers UNIMPLEMENTED for a method not registered)."""
    handlers.register(
        server,
        service,
        {
            method.name: _checked(method, getattr(servicer, method.name))
            for method in service.methods
            if getattr(type(servicer), method.name) is not getattr(generated_base, method.name)
        },
    )


def add_health_and_reflection(
    server: grpc.aio.Server, health_servicer: object, service_names: Iterable[str], *, reflection_on: bool = True
) -> None:
    """What health_pb2_grpc.add_HealthServicer_to_server and
    reflection.enable_server_reflection do, with malformed requests checked
    (reflection only when `reflection_on`: --no-reflection turns it off)."""
    add_checked_servicer(
        server, health_servicer, health_pb2.DESCRIPTOR.services_by_name["Health"], health_pb2_grpc.HealthServicer
    )
    if not reflection_on:
        return
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    add_checked_servicer(
        server,
        reflection_aio.ReflectionServicer(names),
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
        reflection_pb2_grpc.ServerReflectionServicer,
    )
