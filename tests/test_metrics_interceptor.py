"""MetricsInterceptor on every handler shape, on a plain grpc.aio server.

Each shape is served both as an async generator and with context.write()
where that applies, ending normally, with context.abort(), with an exception
and by cancellation; the counters must move by exactly the messages and
the final code of each call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from interactions_server import metrics
from interactions_server.rpc import MetricsInterceptor
from tests.metrics_support import Samples, delta, scrape

SERVICE = "test.Shapes"


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"abort":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no")
    if request == b"raise":
        raise RuntimeError("boom")
    if request == b"sleep":
        await asyncio.sleep(30)
    return request


async def client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    received = [r async for r in requests]
    if b"abort" in received:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no")
    return b"%d" % len(received)


async def client_stream_reader(request: object, context: grpc.aio.ServicerContext) -> bytes:
    count = 0
    while (await context.read()) is not grpc.aio.EOF:
        count += 1
    return b"%d" % count


async def server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(int(request)):
        yield b"r"
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enough")


async def server_stream_writer(request: bytes, context: grpc.aio.ServicerContext) -> None:
    for _ in range(int(request)):
        await context.write(b"w")


async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        if request == b"raise":
            raise RuntimeError("boom")
        if request == b"sleep":
            await asyncio.sleep(30)
        yield request
        yield request


async def bidi_writer(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
    async for request in requests:
        await context.write(request)


HANDLERS: dict[str, grpc.RpcMethodHandler] = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
    "ClientStreamReader": grpc.stream_unary_rpc_method_handler(client_stream_reader),
    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
    "ServerStreamWriter": grpc.unary_stream_rpc_method_handler(server_stream_writer),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    "BidiWriter": grpc.stream_stream_rpc_method_handler(bidi_writer),
}


@pytest.fixture(scope="module")
def exporter() -> Iterator[metrics.Exporter]:
    exporter = metrics.start_exporter("127.0.0.1:0")
    yield exporter
    exporter.close()


@pytest.fixture
async def shapes(exporter: metrics.Exporter) -> AsyncIterator[tuple[grpc.aio.Channel, str]]:
    server = grpc.aio.server(interceptors=[MetricsInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, f"http://127.0.0.1:{exporter.port}/metrics"
    await server.stop(0)


def labels(grpc_type: str, method: str) -> dict[str, str]:
    return {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method}


def check(
    after: Samples, before: Samples, grpc_type: str, method: str, codes: dict[str, int], received: int, sent: int
) -> None:
    calls = sum(codes.values())
    assert delta(after, before, "grpc_server_started_total", **labels(grpc_type, method)) == calls
    for code, n in codes.items():
        assert delta(after, before, "grpc_server_handled_total", **labels(grpc_type, method), grpc_code=code) == n, code
    assert delta(after, before, "grpc_server_handled_total", **labels(grpc_type, method)) == calls
    assert delta(after, before, "grpc_server_handling_seconds_count", **labels(grpc_type, method)) == calls
    assert delta(after, before, "grpc_server_msg_received_total", **labels(grpc_type, method)) == received
    assert delta(after, before, "grpc_server_msg_sent_total", **labels(grpc_type, method)) == sent


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_unary(shapes: tuple[grpc.aio.Channel, str]) -> None:
    channel, url = shapes
    call = channel.unary_unary(f"/{SERVICE}/Unary")
    before = await scrape(url)
    assert await call(b"ok") == b"ok"
    assert await code_of(call(b"abort")) == grpc.StatusCode.FAILED_PRECONDITION
    assert await code_of(call(b"raise")) == grpc.StatusCode.UNKNOWN
    assert await code_of(call(b"sleep", timeout=0.2)) == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server notices the deadline on its own clock; let it finish the call.
    await asyncio.sleep(0.3)
    after = await scrape(url)
    codes = {"OK": 1, "FailedPrecondition": 1, "Unknown": 1, "Canceled": 1}
    check(after, before, "unary", "Unary", codes, received=4, sent=1)


async def test_client_stream(shapes: tuple[grpc.aio.Channel, str]) -> None:
    channel, url = shapes
    before = await scrape(url)
    assert await channel.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"a", b"b", b"c"])) == b"3"
    call = channel.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"a", b"abort"]))
    assert await code_of(call) == grpc.StatusCode.INVALID_ARGUMENT
    assert await channel.stream_unary(f"/{SERVICE}/ClientStreamReader")(iter([b"a", b"b"])) == b"2"
    after = await scrape(url)
    check(after, before, "client_stream", "ClientStream", {"OK": 1, "InvalidArgument": 1}, received=5, sent=1)
    check(after, before, "client_stream", "ClientStreamReader", {"OK": 1}, received=2, sent=1)


async def test_server_stream(shapes: tuple[grpc.aio.Channel, str]) -> None:
    channel, url = shapes
    before = await scrape(url)
    call = channel.unary_stream(f"/{SERVICE}/ServerStream")(b"3")
    assert [r async for r in _until_error(call)] == [b"r"] * 3
    assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    writer = channel.unary_stream(f"/{SERVICE}/ServerStreamWriter")(b"4")
    assert [r async for r in writer] == [b"w"] * 4
    after = await scrape(url)
    check(after, before, "server_stream", "ServerStream", {"ResourceExhausted": 1}, received=1, sent=3)
    check(after, before, "server_stream", "ServerStreamWriter", {"OK": 1}, received=1, sent=4)


async def test_bidi_stream(shapes: tuple[grpc.aio.Channel, str]) -> None:
    channel, url = shapes
    before = await scrape(url)
    call = channel.stream_stream(f"/{SERVICE}/Bidi")(iter([b"a", b"b"]))
    assert [r async for r in call] == [b"a", b"a", b"b", b"b"]
    failing = channel.stream_stream(f"/{SERVICE}/Bidi")(iter([b"a", b"raise"]))
    assert [r async for r in _until_error(failing)] == [b"a", b"a"]
    assert await failing.code() == grpc.StatusCode.UNKNOWN
    writer = channel.stream_stream(f"/{SERVICE}/BidiWriter")(iter([b"x", b"y", b"z"]))
    assert [r async for r in writer] == [b"x", b"y", b"z"]
    # A call the client cancels while the server works on it ends as Canceled.
    # (One whose handler only sees its request stream end cannot tell: grpc.aio
    # reports that as the end of the stream.)
    open_call = channel.stream_stream(f"/{SERVICE}/Bidi")()
    await open_call.write(b"q")
    assert await open_call.read() == b"q"
    await open_call.write(b"sleep")
    await asyncio.sleep(0.1)
    open_call.cancel()
    await asyncio.sleep(0.2)
    after = await scrape(url)
    check(after, before, "bidi_stream", "Bidi", {"OK": 1, "Unknown": 1, "Canceled": 1}, received=6, sent=8)
    check(after, before, "bidi_stream", "BidiWriter", {"OK": 1}, received=3, sent=3)


async def _until_error(call: Any) -> AsyncIterator[bytes]:
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError:
        return
