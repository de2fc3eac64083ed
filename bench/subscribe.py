"""(s): the event stream (issue 19, docs/subscribe.md).

- what the xid stamp costs ingest: (b) with the log as migration 0009 leaves
  it (xid column, BRIN index), without the column, with a B-tree instead of
  the BRIN, and with a NOTIFY in every ingest statement (the wake-up not
  chosen), interleaved, `repeat` rounds;
- (b) with 8 subscribers attached against (b) without, in pairs;
- commit -> delivery latency with 1 and with 8 subscribers while a paced
  stream logs at half the (b) rate measured in the same run: from the ack of
  the event's batch to the arrival of the response that holds it;
- server RSS while a consumer reads at 1% of the ingest rate, for a minute.

The subscribers and the paced writer are child processes of this module
(`python -m bench.subscribe subscribers|writer ...`). Subscribers other
than the measured one take the responses as bytes (no parsing), so that the
figure is the server's cost, not the cost of consumers that would run on
other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench.measures import Bench, Throughput, percentile, stream_run
from bench.proc_stats import RssSampler, RssSamples
from bench.workload import stream_events
from interactions_client.v1 import event_stream_service_pb2 as pb
from interactions_client.v1 import interaction_service_pb2 as ipb

SEED_STREAM_COST, SEED_SUBSCRIBED, SEED_LATENCY, SEED_MEMORY = 20, 21, 22, 23
VARIANTS = ("xid + BRIN (0009)", "no xid column", "xid + B-tree", "xid + BRIN + NOTIFY")
SUBSCRIBERS = 8
LATENCY_SECONDS = 15.0
MEMORY_SECONDS = 60.0
QUICK_SECONDS = 3.0  # both, with --quick
SLOW_SHARE = 0.01  # the slow consumer reads at 1% of the ingest rate
WRITER_BATCH = 100  # events per paced stream batch
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
SUBSCRIBE = "/interactions.v1.EventStreamService/SubscribeEvents"
STREAM = "/interactions.v1.InteractionService/StreamEvents"

_BRIN = "CREATE INDEX events_xid_brin ON events USING brin (xid) WITH (pages_per_range = 32, autosummarize = on)"
_APPLY: dict[str, list[str]] = {
    VARIANTS[0]: [],
    VARIANTS[1]: ["ALTER TABLE events DROP COLUMN xid"],
    VARIANTS[2]: ["DROP INDEX events_xid_brin", "CREATE INDEX events_xid_btree ON events (xid)"],
    VARIANTS[3]: [
        "CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM pg_notify('interactions_bench', ''); RETURN NULL; END$$",
        "CREATE TRIGGER bench_notify AFTER INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION bench_notify()",
    ],
}
_REVERT: dict[str, list[str]] = {
    VARIANTS[0]: [],
    VARIANTS[1]: [
        "ALTER TABLE events ADD COLUMN xid bigint NOT NULL DEFAULT 0",
        "ALTER TABLE events ALTER COLUMN xid SET DEFAULT (pg_current_xact_id()::text::bigint)",
        _BRIN,
    ],
    VARIANTS[2]: ["DROP INDEX events_xid_btree", _BRIN],
    VARIANTS[3]: ["DROP TRIGGER bench_notify ON events", "DROP FUNCTION bench_notify()"],
}


@dataclass(slots=True)
class Delivery:
    subscribers: int
    rate: float  # events/s offered by the paced writer
    achieved: float  # events/s the writer got acknowledged
    events: int  # delivered to the measured subscriber
    p50: float  # seconds, from the batch's ack to the arrival of its response
    p99: float
    max: float
    from_send_p99: float  # from the batch's send (an upper bound)
    missing: int  # acknowledged but not delivered to the measured subscriber


@dataclass(slots=True)
class SlowConsumer:
    rss: RssSamples
    ingest_rate: float
    read_rate: float  # events/s the slow consumer read
    seconds: float


@dataclass(slots=True)
class SubscriptionResults:
    variants: dict[str, list[Throughput]] = field(default_factory=dict)
    pairs: list[tuple[Throughput, Throughput]] = field(default_factory=list)  # (without, with 8 subscribers)
    delivery: list[Delivery] = field(default_factory=list)
    slow: SlowConsumer | None = None


# --- the orchestrator ----------------------------------------------------------------


async def _execute(url: str, statements: Sequence[str]) -> None:
    if not statements:
        return
    connection = await asyncpg.connect(url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def _children(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """`python -m bench.subscribe ARGS --out FILE`, running until the block ends
    (then SIGTERM); yields the process and the file it writes when it stops."""
    out = Path(tempfile.mkstemp(prefix="interactions-bench-s-", suffix=".json")[1])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.subscribe", *args, "--out", str(out), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"bench.subscribe {args[0]} did not start: {line!r}")
        yield process, out
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 60)


def _read(out: Path) -> Any:
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


async def run(bench: Bench) -> SubscriptionResults:
    results = SubscriptionResults()
    events, target = bench.config.events, bench.server.target
    # 1. The schema's cost, before any subscription (the reader needs the column).
    for repetition in range(max(bench.config.repeat, 1)):
        for variant in VARIANTS:
            await _execute(bench.url, _APPLY[variant])
            try:
                result, _ = await stream_run(
                    bench,
                    label=f"(s) (b) {variant}",
                    seed=bench.seed(SEED_STREAM_COST) * 10 + repetition,
                    events=events,
                )
            finally:
                await _execute(bench.url, _REVERT[variant])
            results.variants.setdefault(variant, []).append(result)
    # 2. (b) with 8 subscribers, in pairs.
    for repetition in range(max(bench.config.repeat, 1)):
        seed = bench.seed(SEED_SUBSCRIBED) * 10 + repetition
        alone, _ = await stream_run(bench, label="(s) (b) without subscribers", seed=seed, events=events)
        async with _children("subscribers", target, "--count", str(SUBSCRIBERS)):
            subscribed, _ = await stream_run(
                bench, label=f"(s) (b) with {SUBSCRIBERS} subscribers", seed=seed, events=events
            )
        results.pairs.append((alone, subscribed))
    # 3. Latency at half the (b) rate of this run.
    half = 0.5 * max(t.rate for t in results.variants[VARIANTS[0]])
    for count in (1, SUBSCRIBERS):
        results.delivery.append(await _delivery(bench, count, half))
    # 4. Memory with a consumer at 1% of the ingest rate.
    results.slow = await _slow_consumer(bench, half)
    return results


async def _delivery(bench: Bench, subscribers: int, rate: float) -> Delivery:
    total = int(rate * (QUICK_SECONDS if bench.config.quick else LATENCY_SECONDS))
    bench.progress(f"(s) delivery latency: {subscribers} subscriber(s), {total:,} events at {rate:,.0f}/s")
    target = bench.server.target
    async with _children("subscribers", target, "--count", str(subscribers), "--measure") as (_, received_file):
        async with _children(
            "writer", target, "--rate", str(rate), "--events", str(total), "--seed", str(bench.seed(SEED_LATENCY))
        ) as (writer, written_file):
            await asyncio.wait_for(writer.wait(), LATENCY_SECONDS * 4 + 60)
        written = _read(written_file)
        await asyncio.sleep(1.0)  # the last responses arrive
    received = _read(received_file)
    arrived = {event_id: at for event_id, at in received["arrivals"]}
    from_ack: list[float] = []
    from_send: list[float] = []
    missing = 0
    for _, sent_at, acked_at, ids in written["batches"]:
        for event_id in ids:
            at = arrived.get(event_id)
            if at is None:
                missing += 1
                continue
            from_ack.append(at - acked_at)
            from_send.append(at - sent_at)
    from_ack.sort()
    from_send.sort()
    delivery = Delivery(
        subscribers,
        rate,
        written["acknowledged"] / max(written["seconds"], 1e-9),
        len(from_ack),
        percentile(from_ack, 0.5),
        percentile(from_ack, 0.99),
        from_ack[-1] if from_ack else float("nan"),
        percentile(from_send, 0.99),
        missing,
    )
    bench.progress(
        f"(s) delivery with {subscribers}: p50 {delivery.p50 * 1000:.1f} ms, p99 {delivery.p99 * 1000:.1f} ms, "
        f"max {delivery.max * 1000:.1f} ms, {missing} missing"
    )
    return delivery


async def _slow_consumer(bench: Bench, rate: float) -> SlowConsumer:
    total = int(rate * (QUICK_SECONDS if bench.config.quick else MEMORY_SECONDS))
    slow = rate * SLOW_SHARE
    bench.progress(f"(s) memory: {total:,} events at {rate:,.0f}/s, a consumer reading {slow:,.0f}/s")
    target = bench.server.target
    sampler = RssSampler(bench.server.pid, interval=0.5)
    async with (
        _children("subscribers", target, "--count", "1", "--read-rate", str(slow)) as (_, received_file),
        sampler,
        _children(
            "writer", target, "--rate", str(rate), "--events", str(total), "--seed", str(bench.seed(SEED_MEMORY))
        ) as (writer, written_file),
    ):
        await asyncio.wait_for(writer.wait(), MEMORY_SECONDS * 4 + 60)
    written, received = _read(written_file), _read(received_file)
    rss = sampler.result()
    seconds = written["seconds"]
    return SlowConsumer(rss, written["acknowledged"] / seconds, received["events"][0] / received["seconds"], seconds)


# --- the children --------------------------------------------------------------------------


async def _subscribers(args: argparse.Namespace) -> dict[str, Any]:
    """`count` subscriptions from now; the first parses its responses and notes
    when each event arrived (--measure) or reads at --read-rate events/s; the
    others take bytes."""
    channels = [grpc.aio.insecure_channel(args.target, options=OWN_CONNECTION) for _ in range(args.count)]
    request = pb.SubscribeEventsRequest().SerializeToString()
    arrivals: list[tuple[str, float]] = []
    events = [0] * args.count
    ready = asyncio.Event()
    subscribed = [0]

    async def follow(index: int) -> None:
        parse = index == 0 and (args.measure or args.read_rate > 0)
        call = channels[index].unary_stream(SUBSCRIBE, request_serializer=None, response_deserializer=None)(request)
        first = True
        async for raw in call:
            if first:
                first = False
                subscribed[0] += 1
                if subscribed[0] == args.count:
                    ready.set()
                continue
            if not parse:
                events[index] += len(raw)  # bytes: the cost stays the server's
                continue
            at = time.monotonic()
            response = pb.SubscribeEventsResponse.FromString(raw)
            events[index] += len(response.events)
            if args.measure:
                arrivals.extend((e.event.event_id, at) for e in response.events)
            if args.read_rate > 0 and response.events:
                await asyncio.sleep(len(response.events) / args.read_rate)

    tasks = [asyncio.create_task(follow(i)) for i in range(args.count)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await ready.wait()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    started = time.monotonic()
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    return {"arrivals": arrivals, "events": events, "seconds": time.monotonic() - started}


async def _writer(args: argparse.Namespace) -> dict[str, Any]:
    """A stream paced at --rate events/s: a batch of WRITER_BATCH events every
    WRITER_BATCH / rate seconds, each batch's send and ack times noted."""
    events = list(stream_events(args.seed, 0, 1, args.events, time.time()))
    batches = [events[i : i + WRITER_BATCH] for i in range(0, len(events), WRITER_BATCH)]
    sent: dict[int, float] = {}
    acked: dict[int, float] = {}
    async with grpc.aio.insecure_channel(args.target, options=OWN_CONNECTION) as channel:
        call = channel.stream_stream(
            STREAM,
            request_serializer=ipb.StreamEventsRequest.SerializeToString,
            response_deserializer=ipb.StreamEventsResponse.FromString,
        )()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        start = time.monotonic()

        async def send() -> None:
            for sequence, batch in enumerate(batches):
                delay = start + sequence * WRITER_BATCH / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent[sequence] = time.monotonic()
                await call.write(ipb.StreamEventsRequest(sequence=sequence, events=batch))
            await call.done_writing()

        sender = asyncio.create_task(send())
        acknowledged = 0
        async for response in call:
            acked[response.sequence] = time.monotonic()
            acknowledged += response.accepted_count + response.duplicate_count
        await sender
    seconds = max(acked.values(), default=start) - start
    rows = [[s, sent[s], acked[s], [e.event_id for e in batches[s]]] for s in sorted(acked)]
    return {"batches": rows, "acknowledged": acknowledged, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.subscribe")
    roles = parser.add_subparsers(dest="role", required=True)
    subscribers = roles.add_parser("subscribers")
    subscribers.add_argument("target")
    subscribers.add_argument("--count", type=int, default=1)
    subscribers.add_argument("--measure", action="store_true")
    subscribers.add_argument("--read-rate", type=float, default=0.0)
    writer = roles.add_parser("writer")
    writer.add_argument("target")
    writer.add_argument("--rate", type=float, required=True)
    writer.add_argument("--events", type=int, required=True)
    writer.add_argument("--seed", type=int, default=0)
    for role in (subscribers, writer):
        role.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = asyncio.run(_subscribers(args) if args.role == "subscribers" else _writer(args))
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    sys.exit(main())
