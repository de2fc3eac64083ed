"""`interactions-server --workers N`: a supervisor and N serving processes.

Real processes throughout: the command is run as operators run it, and which
process holds a connection is read from the kernel (/proc), not from the
server's own word.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.events import valid_event
from tests.support import ServerProcess, cli, postgres_directory

SERVING = health_pb2.HealthCheckResponse.SERVING
LISTENING = r"listening on (127\.0\.0\.1:\d+) with 2 workers"
# A channel of its own per connection: channels with equal arguments would
# otherwise share one connection through gRPC's global subchannel pool.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads connections from /proc")


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Worker number -> pid of the workers the supervisor started last."""
    pids: dict[int, int] = {}
    for line in server.log:
        if match := re.search(r"worker (\d+) started \(pid (\d+)\)", line):
            pids[int(match[1])] = int(match[2])
    return pids


def connection_owners(port: int, pids: set[int]) -> list[int]:
    """For each established connection accepted on `port`, the pid (among
    `pids`) whose file descriptors hold its socket."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # ESTABLISHED, server side
                    inodes.add(fields[9])
    owners = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(FileNotFoundError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        owners.append(pid)
    return owners


@contextlib.asynccontextmanager
async def channels(address: str, count: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    opened = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(count)]
    try:
        yield opened
    finally:
        for channel in opened:
            await channel.close()


async def serving(channel: grpc.aio.Channel) -> bool:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(response.status == SERVING)


async def test_two_workers_share_the_port_and_connections_land_on_both(database_url: str) -> None:
    async with cli("--workers", "2", "--listen", "127.0.0.1:0", "--database-url", database_url) as server:
        address = (await server.wait_for_line(LISTENING))[1]
        pids = worker_pids(server)
        assert len(pids) == 2 and server.process.pid not in pids.values()
        async with channels(address, 16) as opened:
            assert all(await asyncio.gather(*(serving(c) for c in opened)))
            owners = connection_owners(int(address.rsplit(":", 1)[1]), set(pids.values()))
        # 16 connections, each placed by the kernel: all on one worker has odds 2**-15.
        assert len(owners) == 16
        assert set(owners) == set(pids.values())
        server.process.send_signal(signal.SIGTERM)
        assert await server.finish() == 0, "".join(server.log)


async def test_a_killed_worker_is_replaced(database_url: str) -> None:
    async with cli("--workers", "2", "--listen", "127.0.0.1:0", "--database-url", database_url) as server:
        address = (await server.wait_for_line(LISTENING))[1]
        victim = worker_pids(server)[1]
        os.kill(victim, signal.SIGKILL)
        await server.wait_for_line(rf"worker 1 \(pid {victim}\) exited with status -9; restarting it")
        replacement = int((await server.wait_for_line(r"worker 1 started \(pid (\d+)\)"))[1])
        await server.wait_for_line(rf"worker 1 \(pid {replacement}\) serving on")
        assert replacement != victim
        async with channels(address, 8) as opened:
            assert all(await asyncio.gather(*(serving(c) for c in opened)))
            owners = connection_owners(int(address.rsplit(":", 1)[1]), {replacement, worker_pids(server)[2]})
        assert replacement in owners
        server.process.send_signal(signal.SIGTERM)
        assert await server.finish() == 0, "".join(server.log)


async def stream_until_stopped(address: str, acknowledged: set[str], sent: set[str], started: asyncio.Event) -> None:
    """Streams batches of new events until the server ends the stream;
    collects the ids of the events it acknowledged."""
    batches: dict[int, list[str]] = {}

    async def write(call: grpc.aio.StreamStreamCall) -> None:
        for sequence in range(10_000):
            events = [valid_event(EventType.EVENT_TYPE_ADD_TO_CART, user_id=f"u{i % 7}") for i in range(50)]
            batches[sequence] = [e.event_id for e in events]
            sent.update(batches[sequence])
            try:
                await call.write(pb.StreamEventsRequest(sequence=sequence, events=events))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the server ended the call: its status is read below
            await asyncio.sleep(0.01)

    async with grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as channel:
        call = InteractionServiceStub(channel).StreamEvents()
        writer = asyncio.create_task(write(call))
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                assert response.accepted_count == 50 and not response.rejected
                acknowledged.update(batches[response.sequence])
                started.set()
        except grpc.aio.AioRpcError:
            pass
        finally:
            writer.cancel()
        # The server ends the call with UNAVAILABLE. A write racing that end
        # fails inside grpcio's client, which then reports INTERNAL "Internal
        # error from Core" instead (the aio call's set_internal_error).
        code, details = await call.code(), await call.details()
        assert code == grpc.StatusCode.UNAVAILABLE or (code, details) == (
            grpc.StatusCode.INTERNAL,
            "Internal error from Core",
        ), (code, details)


async def test_sigterm_drains_every_worker_and_loses_nothing_acknowledged(database_url: str) -> None:
    acknowledged: set[str] = set()
    sent: set[str] = set()
    async with cli(
        "--workers", "2", "--listen", "127.0.0.1:0", "--database-url", database_url, "--shutdown-grace", "10"
    ) as server:
        address = (await server.wait_for_line(LISTENING))[1]
        started = [asyncio.Event() for _ in range(6)]
        streams = [asyncio.create_task(stream_until_stopped(address, acknowledged, sent, s)) for s in started]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 30)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*streams), 30)
        code = await server.finish()
    log = "".join(server.log)
    assert code == 0, log
    assert "stopping 2 workers" in log and log.rstrip().endswith("stopped")
    assert "Traceback" not in log

    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT event_id::text AS id FROM events")
    finally:
        await connection.close()
    logged = [r["id"] for r in rows]
    assert len(logged) == len(set(logged)), "an event was logged twice"
    assert acknowledged <= set(logged), f"{len(acknowledged - set(logged))} acknowledged events are not in the log"
    assert set(logged) <= sent
    assert len(acknowledged) >= 6 * 50


# --- the embedded database ----------------------------------------------------


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postgres" / "postmaster.pid").read_text().splitlines()[0])


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_server_exits_when_its_embedded_database_dies(workers: str) -> None:
    with postgres_directory() as directory:
        data_dir = directory / "data"
        async with cli("--workers", workers, "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)) as server:
            await server.wait_for_line(r"listening on 127\.0\.0\.1:\d+")
            pid = postmaster_pid(data_dir)
            os.kill(pid, signal.SIGKILL)
            code = await server.finish()
    log = "".join(server.log)
    assert code == 3, log
    assert f"the embedded PostgreSQL (pid {pid}) has exited" in log
    assert "Traceback" not in log


async def test_a_second_server_on_the_same_data_directory_is_refused() -> None:
    with postgres_directory() as directory:
        data_dir = directory / "data"
        async with cli("--listen", "127.0.0.1:0", "--data-dir", str(data_dir)) as first:
            address = (await first.wait_for_line(r"listening on (127\.0\.0\.1:\d+)"))[1]
            async with cli("--listen", "127.0.0.1:0", "--data-dir", str(data_dir)) as second:
                code = await second.finish()
            errors = [line for line in second.log if " ERROR " in line]
            assert code == 2, "".join(second.log)
            assert len(errors) == 1 and "Traceback" not in "".join(second.log)
            assert f"the data directory {data_dir.resolve()} is in use by another interactions-server" in errors[0]
            async with grpc.aio.insecure_channel(address) as channel:
                assert await serving(channel)  # the first one is untouched
            first.process.send_signal(signal.SIGTERM)
            assert await first.finish() == 0


async def test_a_second_server_on_the_port_of_a_running_one_is_refused(database_url: str) -> None:
    """SO_REUSEPORT is among the workers of one supervisor only: another
    server's workers must not join them."""
    async with cli("--workers", "2", "--listen", "127.0.0.1:0", "--database-url", database_url) as first:
        address = (await first.wait_for_line(LISTENING))[1]
        for workers in ("2", "1"):
            async with cli("--workers", workers, "--listen", address, "--database-url", database_url) as second:
                code = await second.finish()
            assert code == 2, "".join(second.log)
            assert any(f"cannot listen on {address}: address already in use" in line for line in second.log)
        first.process.send_signal(signal.SIGTERM)
        assert await first.finish() == 0


def test_workers_auto_is_one_per_core() -> None:
    from interactions_server.cli import build_parser

    assert build_parser().parse_args(["--workers", "auto"]).workers == (os.cpu_count() or 1)
    assert build_parser().parse_args([]).workers == 1
