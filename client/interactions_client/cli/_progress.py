"""A text progress report on stderr: a redrawn bar on a terminal, a periodic line otherwise."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    """Reports lines read (and the share of the file, when its size is known) and events/s."""

    def __init__(self, out: TextIO, total_bytes: int | None, *, line_every: float = 5.0, bar_width: int = 30) -> None:
        self._out = out
        self._tty = out.isatty()
        self._total_bytes = total_bytes or None
        self._interval = 0.1 if self._tty else line_every
        self._bar_width = bar_width
        self._started = time.monotonic()
        self._last = self._started

    def update(self, lines: int, bytes_read: int, events: int) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._write(lines, bytes_read, events, now)

    def finish(self, lines: int, bytes_read: int, events: int) -> None:
        self._write(lines, bytes_read, events, time.monotonic())
        if self._tty:
            self._out.write("\n")
        self._out.flush()

    def _write(self, lines: int, bytes_read: int, events: int, now: float) -> None:
        rate = events / max(now - self._started, 1e-9)
        text = f"{lines:,} lines  {rate:,.0f} events/s"
        if self._total_bytes:
            share = min(bytes_read / self._total_bytes, 1.0)
            text = f"{share:4.0%}  {text}"
            if self._tty:
                filled = round(share * self._bar_width)
                text = f"[{'#' * filled}{'.' * (self._bar_width - filled)}] {text}"
        if self._tty:
            self._out.write(f"\r{text}\x1b[K")  # \x1b[K: clear what a longer previous line left
        else:
            self._out.write(f"progress: {text}\n")
        self._out.flush()
