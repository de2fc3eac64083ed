"""The bulk streamer for synchronous code: the asyncio EventStreamer, run in a
background thread with its own event loop and channel.

Same promise, totals and options as EventStreamer; `send` blocks while the
window is full. `on_rejected` is called on the background thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from interactions_client.channel import ChannelOptions, Metadata, TlsConfig, create_aio_channel, with_metadata
from interactions_client.results import Rejection
from interactions_client.streamer import EventStreamer, RejectionCallback, StreamTotals, Undelivered
from interactions_client.v1.event_pb2 import Event
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub

T = TypeVar("T")


class SyncEventStreamer:
    """`with client.stream() as s: s.send(event)` (see EventStreamer)."""

    def __init__(
        self,
        target: str,
        *,
        tls: TlsConfig | None,
        options: ChannelOptions,
        metadata: Metadata = (),
        batch_size: int,
        linger: float,
        max_in_flight: int,
        retry_timeout: float,
        validate: bool,
        on_rejected: RejectionCallback | None,
        raise_on_failure: bool,
    ) -> None:
        self._target = target
        self._tls = tls
        self._options = options
        self._metadata = metadata
        self._streamer_options: dict[str, Any] = {
            "batch_size": batch_size,
            "linger": linger,
            "max_in_flight": max_in_flight,
            "retry_timeout": retry_timeout,
            "validate": validate,
            "on_rejected": on_rejected,
            "raise_on_failure": raise_on_failure,
        }
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="interactions-streamer", daemon=True)
        self._streamer: EventStreamer | None = None

    @property
    def streamer(self) -> EventStreamer:
        if self._streamer is None:
            raise RuntimeError("use the streamer inside `with`")
        return self._streamer

    @property
    def totals(self) -> StreamTotals:
        return self.streamer.totals

    @property
    def rejections(self) -> list[Rejection]:
        return self.streamer.rejections

    @property
    def undelivered(self) -> list[Undelivered]:
        return self.streamer.undelivered

    @property
    def buffered(self) -> int:
        return self.streamer.buffered

    def send(self, event: Event, tag: object = None) -> None:
        self._run(self.streamer.send(event, tag))

    def flush(self) -> None:
        self._run(self.streamer.flush())

    def __enter__(self) -> SyncEventStreamer:
        self._thread.start()
        try:
            self._run(self._open())
        except BaseException:
            self._stop_thread()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._run(self._close(exc_type, exc, tb))
        finally:
            self._stop_thread()

    async def _open(self) -> None:
        # The aio channel belongs to this loop, so it is made here, in the loop's thread.
        self._channel = create_aio_channel(self._target, self._tls, self._options)
        stub = with_metadata(InteractionServiceStub(self._channel), self._metadata)
        self._streamer = EventStreamer(stub.StreamEvents, **self._streamer_options)
        await self._streamer.__aenter__()

    async def _close(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.streamer.__aexit__(exc_type, exc, tb)
        finally:
            await self._channel.close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
