"""`interactions import FILE.jsonl`: one Event per line, in protobuf's JSON
mapping, through the bulk streamer.

Memory stays bounded whatever the file size: the file is read in chunks of
about 1 MiB, the streamer holds a bounded window of events, and rejected lines
are written out as they are known.

Re-running an import is safe and gives only duplicates: events are
deduplicated by event_id, and a line without one gets
uuid5(IMPORT_NAMESPACE, <the line with surrounding whitespace removed>),
the same on every run. (So two identical lines without event_id are one
event; give them event_ids or different occurred_at to keep both.)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO, TextIO, cast

from google.protobuf import json_format

from interactions_client.cli._progress import Progress
from interactions_client.client import InteractionsClient
from interactions_client.errors import DeliveryFailedError
from interactions_client.results import Rejection
from interactions_client.v1.event_pb2 import Event

IMPORT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "interactions-client:import")
"""Namespace of the event_ids derived for lines without one."""

_READ_HINT = 1 << 20  # bytes read at most per chunk


@dataclass(slots=True)
class ImportTotals:
    """Every line read is counted once: lines == accepted + duplicate + rejected + malformed + blank + failed."""

    lines: int = 0  # every line read, blank ones included
    blank: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0  # valid JSON that broke a rule
    malformed: int = 0  # not an Event in protobuf JSON
    failed: int = 0  # not confirmed by the server: re-run the import
    resent: int = 0
    seconds: float = 0.0
    rejected_file: str | None = None  # where rejected and malformed lines went, when there were any
    failure: DeliveryFailedError | None = None  # why events failed, when they did (not in as_dict)

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "failure"}


def rejected_path_for(path: Path) -> Path:
    """events.jsonl -> events.rejected.jsonl"""
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(f"{stem}.rejected.jsonl")


def derived_event_id(line: str) -> str:
    return str(uuid.uuid5(IMPORT_NAMESPACE, line))


class RejectedLines:
    """Writes one JSON object per rejected or malformed line; the file is created
    only when there is something to write (and a stale one from an earlier run
    is removed when there is not)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None
        self.count = 0

    def write(self, record: dict[str, object]) -> None:
        if self._file is None:
            self._file = self.path.open("w", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def rejection(self, rejection: Rejection) -> None:
        line_number, text = cast(tuple[int, str], rejection.tag)
        violations = [{"field": v.field, "description": v.description} for v in rejection.violations]
        self.write({"line": line_number, "text": text, "violations": violations})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:
            self.path.unlink(missing_ok=True)


async def import_jsonl(
    client: InteractionsClient,
    source: BinaryIO,
    *,
    rejected: RejectedLines,
    progress: Progress | None = None,
    batch_size: int = 500,
    retry_timeout: float = 60.0,
) -> ImportTotals:
    """Streams every line of `source` to the service; see the module docstring."""
    totals = ImportTotals()
    started = time.monotonic()
    bytes_read = 0
    # It raises DeliveryFailedError (from send, or at exit) when it gave up; that is caught below.
    stream = client.stream(batch_size=batch_size, retry_timeout=retry_timeout, on_rejected=rejected.rejection)
    try:
        async with stream:
            lines = LineReader(source)
            while chunk := await asyncio.to_thread(lines.read):
                for raw in chunk:
                    totals.lines += 1
                    bytes_read += len(raw)
                    event = _parse_line(raw, totals, rejected)
                    if event is not None:
                        await stream.send(event, tag=(totals.lines, event_text(raw)))
                    if progress is not None:
                        progress.update(totals.lines, bytes_read, stream.totals.sent)
    except DeliveryFailedError as error:  # the streamer gave up: stop reading, report what was read
        totals.failure = error
    finally:
        rejected.close()
    counts = stream.totals
    totals.accepted, totals.duplicate, totals.rejected = counts.accepted, counts.duplicate, counts.rejected
    # The line whose send() found the streamer failed was never taken: it failed too.
    unsent = totals.lines - totals.blank - totals.malformed - counts.sent
    totals.failed, totals.resent = counts.failed + unsent, counts.resent
    if totals.failure is not None and unsent:  # say the count the totals show
        cause = totals.failure.cause
        reason = f": {cause}" if cause is not None else ""
        message = f"{totals.failed} event(s) were not confirmed{reason}"
        totals.failure = DeliveryFailedError(message, failed=totals.failed, cause=cause)
    totals.seconds = round(time.monotonic() - started, 3)
    totals.rejected_file = str(rejected.path) if rejected.count else None
    if progress is not None:
        progress.finish(totals.lines, bytes_read, counts.sent)
    return totals


class LineReader:
    """The lines of a binary stream in chunks of up to about 1 MiB, each chunk as soon as
    it is there: unlike readlines(hint), a pipe's lines are not held back until 1 MiB
    has arrived, so `tail -f log | interactions import -` sends as it goes."""

    def __init__(self, source: BinaryIO) -> None:
        # read1: what is available now (at least one byte, or the end); files opened "rb" and stdin have it.
        self._read: Callable[[int], bytes] = getattr(source, "read1", source.read)
        self._tail = b""

    def read(self) -> list[bytes]:
        """The next complete lines, each with its b"\\n" (the input's last line may lack it); [] at the end."""
        while data := self._read(_READ_HINT):
            *lines, self._tail = (self._tail + data).split(b"\n")
            if lines:
                return [line + b"\n" for line in lines]
        tail, self._tail = self._tail, b""
        return [tail] if tail else []


def event_text(raw: bytes) -> str:
    """The line as written, without its line break."""
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")


def _parse_line(raw: bytes, totals: ImportTotals, rejected: RejectedLines) -> Event | None:
    """The line's Event, or None for a blank or malformed line (counted and reported here)."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        _malformed(totals, rejected, raw, f"not UTF-8: {error}")
        return None
    if not text:
        totals.blank += 1
        return None
    try:
        document = json.loads(text)
        if not isinstance(document, dict):  # json_format would read `[]` as an empty Event
            raise json_format.ParseError(f"expected a JSON object, got {type(document).__name__}")
        event = json_format.ParseDict(document, Event())
    except (json_format.ParseError, ValueError, RecursionError) as error:
        _malformed(totals, rejected, raw, str(error))
        return None
    if not event.event_id:
        event.event_id = derived_event_id(text)
    return event


def _malformed(totals: ImportTotals, rejected: RejectedLines, raw: bytes, error: str) -> None:
    totals.malformed += 1
    rejected.write({"line": totals.lines, "text": event_text(raw), "error": error})
