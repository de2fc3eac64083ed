"""Fault 7: idle and half-sent streams (issue 17 item 4), against the
`interactions-server` command (a subprocess, so that its RSS can be measured).

3,000 StreamEvents calls that send nothing, and 500 that send the first
kilobyte of a 100 kB request and then nothing more (raw HTTP/2 frames: a
grpc client always sends whole messages), all open at once.

Promise: they hold no byte budget and no slot of the unary calls, so a new
client's LogEvent is served meanwhile; streams beyond --max-open-streams
(1,000 by default) are refused at once with RESOURCE_EXHAUSTED; the server
closes each open one once it has been idle for --stream-idle-timeout, with
UNAVAILABLE naming the flag (trailers or RST_STREAM for the half-sent ones);
afterwards the RSS is back within 20% of its start and the log holds exactly
what was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import struct
import time

import grpc
import grpc.aio

from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.faults.ledger import RAW_CHANNEL_OPTIONS, Ledger, check_log_and_state, make_events, report
from tests.faults.postgres import OwnPostgres
from tests.faults.test_overload import interactions_server, timed_call

IDLE_STREAMS = 3_000
HALF_SENT_STREAMS = 500
CHANNELS = 10
RAW_CONNECTIONS = 10  # 50 half-sent streams each: 50 kB, within a connection's 64 kB window
IDLE_TIMEOUT = 8.0  # --stream-idle-timeout of the test's server
MAX_OPEN_STREAMS = 1_000  # the server's default --max-open-streams: the half-sent ones and 500 idle
RSS_TOLERANCE = 1.2
PROBE_CALLS = 30
METHOD = b"/interactions.v1.InteractionService/StreamEvents"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman (lengths < 127)."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_HEADERS, END_STREAM, ACK = 0x4, 0x1, 0x1


class HalfSender:
    """A raw HTTP/2 connection whose StreamEvents calls each send the first
    kilobyte of a 100 kB request and never the rest. Counts the streams the
    server ended (RST_STREAM, or a frame with END_STREAM: the trailers)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.ended: set[int] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def open(self, streams: int) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._writer = writer
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(SETTINGS, 0, 0, b""))
        self._reader_task = asyncio.create_task(self._read(reader))
        headers = b"".join(
            _literal(n, v)
            for n, v in (
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", METHOD),
                (b":authority", f"{self.host}:{self.port}".encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            )
        )
        partial = b"\x00" + struct.pack(">I", 100_000) + b"\x0a" * 1_000  # a length prefix, then 1 kB of it
        for i in range(streams):
            stream = 2 * i + 1
            writer.write(_frame(HEADERS, END_HEADERS, stream, headers) + _frame(DATA, 0, stream, partial))
        await writer.drain()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = await reader.readexactly(length)
                assert self._writer is not None
                if kind == SETTINGS and not flags & ACK:
                    self._writer.write(_frame(SETTINGS, ACK, 0, b""))
                elif kind == PING and not flags & ACK:
                    self._writer.write(_frame(PING, ACK, 0, payload))
                elif stream and (kind == RST_STREAM or (kind in (HEADERS, DATA) and flags & END_STREAM)):
                    self.ended.add(stream)  # reset, or its trailers (the status) sent
                elif kind == GOAWAY:
                    return

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


async def _idle(stub: InteractionServiceStub) -> grpc.aio.StreamStreamCall:
    call = stub.StreamEvents(timeout=120)
    await call.wait_for_connection()
    return call


async def _probe(stubs: list[InteractionServiceStub], ledger: Ledger, rnd: random.Random) -> list[float]:
    seconds = []
    for i in range(PROBE_CALLS):
        code, took, _ = await timed_call(stubs[i % len(stubs)], make_events(1, rnd, prefix=f"p{i}"), ledger)
        assert code == "OK", code
        seconds.append(took)
    return seconds


async def test_idle_and_half_sent_streams_starve_nothing_and_are_closed(postgres: OwnPostgres) -> None:
    rnd = random.Random(7)
    ledger = Ledger()
    async with (
        interactions_server(postgres.url, "--stream-idle-timeout", str(IDLE_TIMEOUT)) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        host, port = server.address.rsplit(":", 1)
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(server.address, options=RAW_CHANNEL_OPTIONS))
            for _ in range(CHANNELS)
        ]
        stubs = [InteractionServiceStub(c) for c in channels]
        before = await _probe(stubs, ledger, rnd)  # warms every channel too
        # The same mix within the limit, opened and closed: what only
        # concurrency allocates once (heaps at that size) is in the start.
        warm_sender = HalfSender(host, int(port))
        await warm_sender.open(HALF_SENT_STREAMS // RAW_CONNECTIONS)
        warm = await asyncio.gather(*(_idle(stubs[i % CHANNELS]) for i in range(MAX_OPEN_STREAMS // 2)))
        await asyncio.sleep(0.5)
        for call in warm:
            call.cancel()
        await warm_sender.close()
        await asyncio.sleep(2.5)  # a malloc trim (every 2 s) has run
        rss_start = server.rss

        opened = time.perf_counter()
        senders = [HalfSender(host, int(port)) for _ in range(RAW_CONNECTIONS)]
        for sender in senders:
            await sender.open(HALF_SENT_STREAMS // RAW_CONNECTIONS)
        await asyncio.sleep(0.5)
        idle = await asyncio.gather(*(_idle(stubs[i % CHANNELS]) for i in range(IDLE_STREAMS)))
        await asyncio.sleep(0.5)
        rss_open = server.rss
        # A new client, while they are all open: its LogEvent is served.
        async with grpc.aio.insecure_channel(server.address, options=RAW_CHANNEL_OPTIONS) as fresh:
            during = await _probe([InteractionServiceStub(fresh)], ledger, rnd)
        open_for = time.perf_counter() - opened
        assert open_for < IDLE_TIMEOUT, f"the streams were not all open at once ({open_for:.1f} s)"

        # Then the server closes every one of them for idleness.
        codes = await asyncio.gather(*(call.code() for call in idle))
        details = {await call.details() or "" for call in idle}
        tally = {c.name: codes.count(c) for c in set(codes)}
        loop = asyncio.get_running_loop()
        until = loop.time() + 2 * IDLE_TIMEOUT
        while sum(len(s.ended) for s in senders) < HALF_SENT_STREAMS and loop.time() < until:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.1)
        half_ended = sum(len(s.ended) for s in senders)
        for sender in senders:
            await sender.close()
        closed_after = time.perf_counter() - opened
        settle_until = loop.time() + 15
        while server.rss > RSS_TOLERANCE * rss_start and loop.time() < settle_until:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.25)
        rss_end = server.rss
        log = server.log()

    mib = 1024 * 1024
    report(
        "idle streams",
        f"{IDLE_STREAMS} idle and {HALF_SENT_STREAMS} half-sent streams open: a new client's LogEvent "
        f"p50 {statistics.median(during) * 1000:.1f} ms (before {statistics.median(before) * 1000:.1f} ms), "
        f"max {max(during) * 1000:.1f} ms; all closed by the server within {closed_after:.1f} s "
        f"(--stream-idle-timeout {IDLE_TIMEOUT:g}): idle { ({c.name: codes.count(c) for c in set(codes)}) }, "
        f"half-sent ended {half_ended}; RSS start {rss_start / mib:.0f} MiB, open {rss_open / mib:.0f} MiB, "
        f"end {rss_end / mib:.0f} MiB ({rss_end / rss_start:.3f} of the start)",
    )
    # Within --max-open-streams (1,000): closed for idleness; beyond it: refused at once.
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}, tally
    assert tally[grpc.StatusCode.UNAVAILABLE.name] == MAX_OPEN_STREAMS - HALF_SENT_STREAMS, tally
    assert all("--stream-idle-timeout" in d or "open streams" in d for d in details), details
    assert half_ended == HALF_SENT_STREAMS
    assert rss_end <= RSS_TOLERANCE * rss_start, f"RSS {rss_end / mib:.0f} MiB, start {rss_start / mib:.0f} MiB"
    await check_log_and_state(postgres.url, ledger)
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
    assert " ERROR " not in log, log[log.index(" ERROR ") - 100 :][:3000]
