"""/metrics of the real server: counters move by exactly what was sent.

In-process (one server, the exporter on port 0), then the real command with
--workers 2, where the endpoint sums both workers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from interactions_server import metrics
from interactions_server.server import App
from tests.events import valid_event
from tests.metrics_support import Samples, delta, scrape, total, value
from tests.support import StartServer, cli, eventually
from tests.test_auth import TOKENS, bearer, write_tokens
from tests.test_workers import LISTENING, channels, connection_owners, serving, worker_pids

VIEW, PURCHASE, CUSTOM = EventType.EVENT_TYPE_VIEW, EventType.EVENT_TYPE_PURCHASE, EventType.EVENT_TYPE_CUSTOM
SERVICE = "interactions.v1.InteractionService"


@pytest.fixture(scope="module")
def metrics_url() -> Iterator[str]:
    exporter = metrics.start_exporter("127.0.0.1:0")
    yield f"http://127.0.0.1:{exporter.port}/metrics"
    exporter.close()


def events_moved(after: Samples, before: Samples, event_type: str, outcome: str) -> float:
    return delta(after, before, "interactions_events_total", event_type=event_type, outcome=outcome)


def handled(after: Samples, before: Samples, grpc_type: str, method: str, code: str) -> float:
    labels = {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}
    return delta(after, before, "grpc_server_handled_total", **labels)


async def test_unary_calls_move_the_counters_by_exactly_the_events_sent(
    server: App, interaction_stub: InteractionServiceStub, metrics_url: str
) -> None:
    before = await scrape(metrics_url)
    first = valid_event(VIEW)
    await interaction_stub.LogEvent(pb.LogEventRequest(event=first))
    await interaction_stub.LogEvent(pb.LogEventRequest(event=first))  # duplicate
    await interaction_stub.LogEvent(pb.LogEventRequest(event=valid_event(CUSTOM)))
    with pytest.raises(grpc.aio.AioRpcError) as rejected:
        await interaction_stub.LogEvent(pb.LogEventRequest(event=valid_event(PURCHASE, user_id="")))
    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    batch = [valid_event(PURCHASE), valid_event(PURCHASE), valid_event(VIEW, product_id="")]  # the last is rejected
    response = await interaction_stub.LogEvents(pb.LogEventsRequest(events=[*batch, batch[0]]))
    assert (response.accepted_count, response.duplicate_count, len(response.rejected)) == (2, 1, 1)
    after = await scrape(metrics_url)

    assert events_moved(after, before, "view", "accepted") == 1
    assert events_moved(after, before, "view", "duplicate") == 1
    assert events_moved(after, before, "view", "rejected") == 1
    assert events_moved(after, before, "custom", "accepted") == 1  # whatever its custom_type
    assert events_moved(after, before, "purchase", "accepted") == 2
    assert events_moved(after, before, "purchase", "duplicate") == 1
    assert events_moved(after, before, "purchase", "rejected") == 1
    assert delta(after, before, "interactions_events_total") == 8  # nothing else moved

    assert handled(after, before, "unary", "LogEvent", "OK") == 3
    assert handled(after, before, "unary", "LogEvent", "InvalidArgument") == 1
    assert handled(after, before, "unary", "LogEvents", "OK") == 1
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "LogEvent"}
    assert delta(after, before, "grpc_server_started_total", **labels) == 4
    assert delta(after, before, "grpc_server_msg_received_total", **labels) == 4
    assert delta(after, before, "grpc_server_msg_sent_total", **labels) == 3  # no response to the rejected call
    assert delta(after, before, "grpc_server_handling_seconds_count", **labels) == 4
    # Every valid event reached the database in some batch (group commit may merge LogEvent calls).
    assert 3 <= delta(after, before, "interactions_batch_events_count") <= 4
    # Rows written: the 3 LogEvent ones, the 2 distinct valid ones of LogEvents (not its repeat).
    assert delta(after, before, "interactions_batch_events_sum") == 3 + 2
    assert delta(after, before, "interactions_commit_seconds_count") == delta(
        after, before, "interactions_batch_events_count"
    )
    assert value(after, "interactions_group_commit_queue") == 0


async def test_a_stream_moves_the_counters_and_the_open_streams_gauge(
    server: App, interaction_stub: InteractionServiceStub, metrics_url: str
) -> None:
    before = await scrape(metrics_url)
    call = interaction_stub.StreamEvents()
    repeated = valid_event(VIEW)
    await call.write(pb.StreamEventsRequest(sequence=1, events=[repeated, valid_event(PURCHASE)]))
    assert (await call.read()).accepted_count == 2
    during = await scrape(metrics_url)
    assert value(during, "interactions_streams_open") == value(before, "interactions_streams_open") + 1
    await call.write(pb.StreamEventsRequest(sequence=2, events=[repeated, valid_event(VIEW, user_id="")]))
    second = await call.read()
    assert (second.accepted_count, second.duplicate_count, len(second.rejected)) == (0, 1, 1)
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    # The server counts the call as handled once its handler has returned.
    await eventually(lambda: _moved(metrics_url, before, "grpc_server_handled_total", grpc_method="StreamEvents"))
    after = await scrape(metrics_url)

    assert events_moved(after, before, "view", "accepted") == 1
    assert events_moved(after, before, "purchase", "accepted") == 1
    assert events_moved(after, before, "view", "duplicate") == 1
    assert events_moved(after, before, "view", "rejected") == 1
    assert handled(after, before, "bidi_stream", "StreamEvents", "OK") == 1
    labels = {"grpc_type": "bidi_stream", "grpc_service": SERVICE, "grpc_method": "StreamEvents"}
    assert delta(after, before, "grpc_server_msg_received_total", **labels) == 2
    assert delta(after, before, "grpc_server_msg_sent_total", **labels) == 2
    assert value(after, "interactions_streams_open") == value(before, "interactions_streams_open")


async def _moved(url: str, before: Samples, name: str, **labels: str) -> bool:
    return delta(await scrape(url), before, name, **labels) > 0


async def test_health_reflection_pool_and_database_gauges(
    server: App, channel: grpc.aio.Channel, metrics_url: str
) -> None:
    before = await scrape(metrics_url)
    health = health_pb2_grpc.HealthStub(channel)
    await health.Check(health_pb2.HealthCheckRequest())
    watch = health.Watch(health_pb2.HealthCheckRequest())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()  # the server's Watch is waiting for a change: its handler is cancelled
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await reflection.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    assert SERVICE in {s.name for s in (await reflection.read()).list_services_response.service}
    await reflection.done_writing()
    assert await reflection.code() == grpc.StatusCode.OK
    await eventually(lambda: _moved(metrics_url, before, "grpc_server_handled_total", grpc_method="Watch"))
    await eventually(
        lambda: _moved(metrics_url, before, "grpc_server_handled_total", grpc_method="ServerReflectionInfo")
    )
    after = await scrape(metrics_url)

    def service_handled(grpc_type: str, service: str, method: str, code: str) -> float:
        labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method, "grpc_code": code}
        return delta(after, before, "grpc_server_handled_total", **labels)

    assert service_handled("unary", "grpc.health.v1.Health", "Check", "OK") == 1
    assert service_handled("server_stream", "grpc.health.v1.Health", "Watch", "Canceled") == 1
    watch_labels = {"grpc_type": "server_stream", "grpc_method": "Watch"}
    assert delta(after, before, "grpc_server_msg_sent_total", **watch_labels) == 1  # written with context.write()
    reflection_service = "grpc.reflection.v1alpha.ServerReflection"
    assert service_handled("bidi_stream", reflection_service, "ServerReflectionInfo", "OK") == 1
    assert value(after, "interactions_database_up") == 1
    # The pool is sampled every second: it holds at least its min_size connections.
    await eventually(
        lambda: _at_least(metrics_url, "interactions_db_pool_connections", server.config.pool_min_size), seconds=5
    )


async def _at_least(url: str, name: str, minimum: float, **labels: str) -> bool:
    return total(await scrape(url), name, **labels) >= minimum


async def test_a_busy_metrics_port_is_an_operator_error(database_url: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ("--listen", "127.0.0.1:0", "--database-url", database_url, "--metrics-listen", f"127.0.0.1:{port}")
        async with cli(*args) as server:
            assert await server.finish() == 2
    errors = [line for line in server.log if "ERROR" in line]
    assert len(errors) == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in errors[0], server.log
    assert "Traceback" not in "".join(server.log)


# --- two workers --------------------------------------------------------------


async def test_two_workers_are_summed(database_url: str) -> None:
    args = ("--workers", "2", "--listen", "127.0.0.1:0", "--database-url", database_url)
    async with cli(*args, "--metrics-listen", "127.0.0.1:0") as server:
        url = (await server.wait_for_line(r"serving metrics on (http://127\.0\.0\.1:\d+/metrics)"))[1]
        address = (await server.wait_for_line(LISTENING))[1]
        pids = worker_pids(server)
        before = await scrape(url)
        # Both workers keep their pool's min_size connections: the gauge is their sum.
        await eventually(lambda: _at_least(url, "interactions_db_pool_connections", 2 * 2), seconds=5)
        async with channels(address, 12) as opened:
            assert all(await asyncio.gather(*(serving(c) for c in opened)))
            owners = connection_owners(int(address.rsplit(":", 1)[1]), set(pids.values()))
            assert set(owners) == set(pids.values()), "all 12 connections on one worker (odds 2**-11)"
            for i, channel in enumerate(opened):
                stub = InteractionServiceStub(channel)
                await stub.LogEvents(pb.LogEventsRequest(events=[valid_event(VIEW, user_id=f"u{i}")] * 2))
                await stub.LogEvent(pb.LogEventRequest(event=valid_event(PURCHASE, user_id=f"u{i}")))
        after = await scrape(url)
        assert events_moved(after, before, "view", "accepted") == 12
        assert events_moved(after, before, "view", "duplicate") == 12
        assert events_moved(after, before, "purchase", "accepted") == 12
        assert handled(after, before, "unary", "LogEvents", "OK") == 12
        assert handled(after, before, "unary", "LogEvent", "OK") == 12
        assert value(after, "interactions_database_up") == 1

        # A worker that dies: its counts stay in the sums, its live gauges go.
        victim = pids[1]
        os.kill(victim, signal.SIGKILL)
        await server.wait_for_line(rf"worker 1 \(pid {victim}\) exited")
        await server.wait_for_line(r"worker 1 \(pid \d+\) serving on")
        killed = await scrape(url)
        assert events_moved(killed, before, "view", "accepted") == 12
        assert handled(killed, before, "unary", "LogEvent", "OK") == 12
        directory = _multiproc_dir(pids[2])
        assert list(directory.glob(f"counter_{victim}.db")), "the dead worker's counters are kept"
        assert not list(directory.glob(f"gauge_live*_{victim}.db")), "the dead worker's live gauges are dropped"

        server.process.send_signal(signal.SIGTERM)
        assert await server.finish() == 0, "".join(server.log)


def _multiproc_dir(worker_pid: int) -> Path:
    """The metrics directory a worker was started with (the supervisor sets it
    after its own start, so its /proc environ does not show it)."""
    with open(f"/proc/{worker_pid}/environ", "rb") as environ:
        variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
    return Path(variables[metrics.MULTIPROC_ENV.encode()].decode())


async def test_with_tokens_the_client_label_is_the_token_name(
    start_server: StartServer, tmp_path: Path, metrics_url: str
) -> None:
    tokens = tmp_path / "tokens.toml"
    write_tokens(tokens, {"writer": TOKENS["writer"]})
    secured = await start_server(auth_tokens=tokens)
    before = await scrape(metrics_url)
    async with grpc.aio.insecure_channel(secured.address) as channel:
        stub = InteractionServiceStub(channel)
        await stub.LogEvent(pb.LogEventRequest(event=valid_event(VIEW)), metadata=bearer("writer"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.LogEvent(pb.LogEventRequest(event=valid_event(VIEW)), metadata=bearer("nobody"))
    after = await scrape(metrics_url)
    assert (
        delta(after, before, "interactions_events_total", event_type="view", outcome="accepted", client="writer") == 1
    )
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "LogEvent"}
    assert delta(after, before, "grpc_server_handled_total", grpc_code="OK", client="writer", **labels) == 1
    # A refused call has no client: the label never carries what a caller merely claimed.
    assert delta(after, before, "grpc_server_handled_total", grpc_code="Unauthenticated", client="", **labels) == 1
    assert "writer-secret" not in str(after) and TOKENS["writer"][0] not in str(after)
