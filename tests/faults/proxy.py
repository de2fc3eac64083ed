"""A TCP proxy in front of PostgreSQL that cuts connections right after a COMMIT.

`CommitCuttingProxy(upstream_socket)` listens on 127.0.0.1:<free port> and
forwards each connection to PostgreSQL's unix socket. It reads the frontend
(client to server) side of the wire protocol just enough to see a COMMIT: a
simple query ('Q') whose text contains COMMIT, or an extended-protocol Parse
('P') of one, in which case the cut waits for the Sync ('S') that makes the
server run it. Once armed (`arm(cuts, every)`), every `every`-th COMMIT is
forwarded and then both sides of its connection are closed at once, `cuts`
times: PostgreSQL commits (the bytes are in its socket buffer before the
close) and the server never sees the answer, the case of an acknowledgement
lost after a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from pathlib import Path

_COMMIT = re.compile(rb"\bCOMMIT\b", re.IGNORECASE)
# Untyped messages of the start-up phase: (int32 length, int32 code, ...).
_SSL_REQUEST, _GSSENC_REQUEST, _CANCEL_REQUEST = 80877103, 80877104, 80877102


class CommitCuttingProxy:
    def __init__(self, upstream_socket: Path) -> None:
        self.upstream_socket = upstream_socket
        self.port = 0
        self.commits_seen = 0  # COMMITs forwarded while armed
        self.cuts_done = 0
        self.connections = 0
        self._cuts_left = 0
        self._every = 1
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def arm(self, cuts: int, every: int = 1) -> None:
        """Cut after every `every`-th COMMIT from now on, `cuts` times."""
        self._cuts_left, self._every, self.commits_seen = cuts, every, 0

    @property
    def armed(self) -> bool:
        return self._cuts_left > 0

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_unix_connection(self.upstream_socket)
        except OSError:
            client_writer.close()
            self._tasks.discard(task)
            return
        writers = (client_writer, server_writer)
        upstream = asyncio.create_task(self._frontend(client_reader, server_writer, writers))
        downstream = asyncio.create_task(self._pipe(server_reader, client_writer))
        try:
            await asyncio.wait((upstream, downstream), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in (upstream, downstream):
                pump.cancel()
            await asyncio.wait((upstream, downstream))
            for writer in writers:
                _abort(writer)
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _frontend(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        """Forwards client messages one by one; after a COMMIT (when it is time) cuts both sides."""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            # Start-up phase: SSLRequest / GSSENCRequest, then the StartupMessage (or a CancelRequest).
            while True:
                header = await reader.readexactly(8)
                length, code = struct.unpack("!ii", header)
                writer.write(header + await reader.readexactly(length - 8))
                await writer.drain()
                if code not in (_SSL_REQUEST, _GSSENC_REQUEST):
                    break
            commit_parsed = False  # an extended-protocol COMMIT waits for its Sync
            while True:
                header = await reader.readexactly(5)
                kind, length = header[:1], struct.unpack("!i", header[1:])[0]
                body = await reader.readexactly(length - 4)
                writer.write(header + body)
                await writer.drain()
                is_commit = False
                if kind == b"Q" and _COMMIT.search(body):
                    is_commit = True
                elif kind == b"P" and _COMMIT.search(body):
                    commit_parsed = True
                elif kind == b"S" and commit_parsed:
                    commit_parsed, is_commit = False, True
                if is_commit and self._cuts_left > 0:
                    self.commits_seen += 1
                    if self.commits_seen % self._every == 0:
                        self._cuts_left -= 1
                        self.cuts_done += 1
                        writer.close()  # flushes what is buffered (the COMMIT), then closes
                        _abort(writers[0])
                        with contextlib.suppress(ConnectionError):
                            await writer.wait_closed()
                        return


def _abort(writer: asyncio.StreamWriter) -> None:
    """Closes now, without waiting for buffered data to drain."""
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
