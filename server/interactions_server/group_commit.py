"""Group commit for unary calls: concurrent LogEvent calls share transactions.

Calls queue their event; a collector takes everything queued whenever a write
slot is free and writes it as one batch, so batching grows with load and an
idle server adds no delay. Each caller is answered after its batch commits,
with its own result: a rejected event fails only its own call, and a database
error fails the calls of that batch only.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from interactions_client.limits import MAX_BATCH_EVENTS
from interactions_client.v1.event_pb2 import Event, FieldViolation
from interactions_server import metrics
from interactions_server.ingest import Ingestor


@dataclass(frozen=True, slots=True)
class Outcome:
    event_id: str
    duplicate: bool
    violations: list[FieldViolation]


_Pending = tuple[Event, "asyncio.Future[Outcome]"]


class GroupCommitter:
    def __init__(self, ingestor: Ingestor, *, max_in_flight: int = 2, max_events: int = MAX_BATCH_EVENTS) -> None:
        self._ingestor = ingestor
        self._max_events = max_events
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._writes: set[asyncio.Task[None]] = set()
        self._collector: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._collector = asyncio.create_task(self._collect(), name="group-commit")

    async def submit(self, event: Event) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        await self._queue.put((event, future))
        metrics.group_commit_queued(1)
        return await future

    async def close(self) -> None:
        """Writes what is queued, waits for the writes in flight, then stops."""
        await self._queue.join()
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector

    async def _collect(self) -> None:
        while True:
            first = await self._queue.get()
            await self._slots.acquire()  # calls keep queueing while every slot is busy
            batch = [first]
            while len(batch) < self._max_events and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            metrics.group_commit_queued(-len(batch))
            task = asyncio.create_task(self._write(batch))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            result = await self._ingestor.write([event for event, _ in batch])
        except Exception as exc:  # every caller of the batch gets the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._slots.release()
            for _ in batch:
                self._queue.task_done()
        violations = {r.index: r.violations for r in result.rejected}
        for i, (_, future) in enumerate(batch):
            if not future.done():  # the caller may have gone (cancelled)
                future.set_result(Outcome(result.event_ids[i], result.duplicate[i], violations.get(i, [])))
