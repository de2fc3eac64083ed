"""Peak server RSS under concurrent bulk streams of large batches.

    python -m bench.stream_memory [STREAMS] [BATCHES]

Starts a throwaway PostgreSQL (pgserver) and the server as a subprocess with
its defaults, then opens STREAMS (20) StreamEvents calls at once, each
sending BATCHES (3) batches of 1,000 valid events of about 14.2 KB (14.2 MB
per batch), and prints the server's RSS before and its peak during the run,
and how every call ended. The target (issue 10): under 600 MB, every event
committed or refused with a retryable code. Full size needs ~1 GB of memory
on the client side too; pass smaller numbers for a quick check.
"""

from __future__ import annotations

import os

# Before gRPC is imported: this process forks only to exec (pgserver's pg_ctl).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio
import sys
import time
import uuid
from collections import Counter

import grpc

from bench.database import EmbeddedDatabase
from bench.services import ServiceProcess
from interactions_client.v1 import interaction_service_pb2 as pb
from interactions_client.v1.event_pb2 import Event, EventType

EVENTS_PER_BATCH = 1_000
ATTRIBUTES = 14  # of 1,000 characters each: about 14.2 KB per event


def batch(sequence: int) -> bytes:
    events = []
    for i in range(EVENTS_PER_BATCH):
        event = Event(
            event_id=str(uuid.uuid4()),
            event_type=EventType.EVENT_TYPE_VIEW,
            user_id=f"user{i % 50}",
            product_id=f"p{i}",
        )
        for k in range(ATTRIBUTES):
            event.attributes[f"k{k}"] = "x" * 1_000
        events.append(event)
    return pb.StreamEventsRequest(sequence=sequence, events=events).SerializeToString()


def rss_mib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of `pid` in MiB."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


async def run(streams: int, batches: int) -> None:
    database = EmbeddedDatabase()
    url = await asyncio.to_thread(database.start)
    server = ServiceProcess.interactions_server(url, database.directory, extra=sys.argv[3:])
    try:
        await server.start()
        async with grpc.aio.insecure_channel(server.target) as channel:
            start = rss_mib(server.pid)[0]
            payloads = [batch(i) for i in range(batches)]
            open_stream = channel.stream_stream(
                "/interactions.v1.InteractionService/StreamEvents",
                request_serializer=None,
                response_deserializer=pb.StreamEventsResponse.FromString,
            )
            codes: Counter[str] = Counter()
            written = 0

            async def one() -> None:
                nonlocal written
                try:
                    async for response in open_stream(iter(payloads)):
                        written += response.accepted_count + response.duplicate_count
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1

            began = time.monotonic()
            await asyncio.gather(*(one() for _ in range(streams)))
            now, peak = rss_mib(server.pid)
            print(
                f"{streams} streams x {batches} batches of {len(payloads[0]) / 1e6:.1f} MB in "
                f"{time.monotonic() - began:.1f} s: calls {dict(codes)}, events written {written}; "
                f"server RSS {start} MiB at start, peak {peak} MiB, {now} MiB at the end"
            )
    finally:
        await server.stop()
        database.stop()


def main() -> None:
    args = [int(a) for a in sys.argv[1:3]]
    asyncio.run(run(*(args + [20, 3][len(args) :])))


if __name__ == "__main__":
    main()
