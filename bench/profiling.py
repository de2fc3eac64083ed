"""Sampling the server with py-spy during a measure, and a text summary of
the samples (`python -m bench.profiling FILE` summarises a saved profile).

py-spy's raw format is one line per distinct stack, "frame;frame;... count",
each frame "function (file:line)", innermost last.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

RATE_HZ = 100
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")

# The component a frame belongs to, first match wins. Without --native,
# py-spy does not see Cython: gRPC's Cython code (the aio server's call
# handling, its completion-queue poller thread) shows as self time of the
# Python frame that called it, asyncio's Handle._run and threading's Thread.run.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("Handle._run (asyncio/events.py)", "native callbacks run by the event loop (mostly gRPC Cython)"),
    ("Thread.run (threading.py)", "native code of Python threads (gRPC's poller)"),
    ("interactions_server/", "server code (interactions_server)"),
    ("interactions_client/", "validation and rules (interactions_client)"),
    ("asyncpg/", "asyncpg"),
    ("grpc/", "grpc (Python and Cython)"),
    ("google/protobuf/", "protobuf"),
    ("json/", "json"),
    ("uuid.py", "uuid"),
    ("asyncio/", "asyncio event loop"),
)


_LIBRARY_COMPONENTS = frozenset(name for _, name in COMPONENTS[2:]) - {"asyncio event loop"}


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class PySpyRecording:
    """`async with PySpyRecording(pid, path):` samples `pid` while the block runs."""

    def __init__(self, pid: int, path: Path, *, native: bool = False) -> None:
        self.pid = pid
        self.path = path
        self.native = native
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> PySpyRecording:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        command = [binary, "record", "--pid", str(self.pid), "--format", "raw", "--rate", str(RATE_HZ)]
        command += ["--nonblocking", "-o", str(self.path)]
        if self.native:
            command.append("--native")
        with self.path.with_suffix(".log").open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=log)
        await asyncio.sleep(0.5)  # attached before the load starts
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    samples: int
    self_top: list[tuple[str, int]]  # (function (file), samples with it innermost)
    inclusive_top: list[tuple[str, int]]  # (function (file), samples with it on the stack), library and project code
    components: list[tuple[str, int]]  # self samples by component

    def render(self, title: str, top: int = 15) -> str:
        def pct(count: int) -> str:
            return f"{100.0 * count / max(self.samples, 1):5.1f}%"

        lines = [f"{title}: {self.samples} samples at {RATE_HZ} Hz (idle excluded)", "", "self time by component:"]
        lines += [f"  {pct(n)}  {name}" for name, n in self.components]
        lines += ["", f"top {top} functions by self time:"]
        lines += [f"  {pct(n)}  {name}" for name, n in self.self_top[:top]]
        lines += ["", f"top {top} project and library functions by inclusive time:"]
        lines += [f"  {pct(n)}  {name}" for name, n in self.inclusive_top[:top]]
        return "\n".join(lines)


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['function']} ({file})"


def component_of(name: str) -> str:
    for marker, component in COMPONENTS:
        if marker in name:
            return component
    return "other (stdlib, interpreter)"


def summarise(raw: str, *, top: int = 25) -> ProfileSummary:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    components: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")] or frames
        total += count
        self_counts[frames[-1]] += count
        components[component_of(frames[-1])] += count
        for name in set(frames):
            if component_of(name) in _LIBRARY_COMPONENTS:
                inclusive[name] += count
    return ProfileSummary(total, self_counts.most_common(top), inclusive.most_common(top), components.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description="summarise a py-spy raw profile")
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    summary = summarise(args.profile.read_text(), top=args.top)
    print(summary.render(str(args.profile), args.top))


if __name__ == "__main__":
    main()
