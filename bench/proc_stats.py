"""What the benchmark reads from /proc (Linux): memory of a process, CPU
time of processes and of the whole machine."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    """A "kB" line of /proc/PID/status, e.g. VmRSS or VmHWM; 0 when absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM (the peak RSS) of `pid` to its current RSS; False when not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd on; the name may hold spaces


def process_cpu_seconds(pid: int, *, with_reaped_children: bool = False) -> float:
    """utime + stime of `pid` (plus that of its children it has waited for)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / _TICKS_PER_SECOND


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def tree_cpu_seconds(root: int) -> dict[int, float]:
    """CPU seconds of `root` (with its reaped children) and of each live child, by pid."""
    seconds = {root: process_cpu_seconds(root, with_reaped_children=True)}
    for child in children_of(root):
        seconds[child] = process_cpu_seconds(child)
    return seconds


@dataclass(frozen=True, slots=True)
class MachineCpu:
    """CPU seconds of all cores since boot, by kind (the first line of /proc/stat)."""

    processes: float  # user, nice, system: time charged to processes
    interrupts: float  # irq, softirq: e.g. loopback network processing
    steal: float  # taken by the hypervisor for other virtual machines

    @classmethod
    def read(cls) -> MachineCpu:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (f / _TICKS_PER_SECOND for f in fields)
        return cls(user + nice + system, irq + softirq, steal)

    def __sub__(self, other: MachineCpu) -> MachineCpu:
        return MachineCpu(
            self.processes - other.processes, self.interrupts - other.interrupts, self.steal - other.steal
        )


@dataclass(slots=True)
class CpuShares:
    """CPU used during a measure, in cores (CPU seconds / wall seconds)."""

    wall_seconds: float
    server: float
    postgres: float
    client: float  # the load processes and the orchestrating process
    machine_processes: float  # every process of the machine, ours included
    interrupts: float  # irq and softirq time (loopback networking is part of it)
    steal: float  # time the hypervisor gave to other machines: noise

    @property
    def other(self) -> float:
        """Cores used by processes outside the benchmark (noise)."""
        return max(0.0, self.machine_processes - self.server - self.postgres - self.client)


@dataclass(slots=True)
class CpuMeter:
    """Start before a measure, `stop(client_seconds)` after it."""

    server_pid: int
    postgres_pid: int
    _wall: float = 0.0
    _server: float = 0.0
    _postgres: dict[int, float] = field(default_factory=dict)
    _machine: MachineCpu = MachineCpu(0.0, 0.0, 0.0)
    _own: float = 0.0

    def start(self) -> None:
        self._wall = time.monotonic()
        self._own = time.process_time()
        self._server = sum(tree_cpu_seconds(self.server_pid).values())  # with --workers: the workers too
        self._postgres = tree_cpu_seconds(self.postgres_pid)
        self._machine = MachineCpu.read()

    def stop(self, client_cpu_seconds: float) -> CpuShares:
        """`client_cpu_seconds`: what the load processes report for the measure."""
        wall = max(time.monotonic() - self._wall, 1e-9)
        client = client_cpu_seconds + time.process_time() - self._own
        server = sum(tree_cpu_seconds(self.server_pid).values()) - self._server
        now = tree_cpu_seconds(self.postgres_pid)
        postgres = sum(seconds - self._postgres.get(pid, 0.0) for pid, seconds in now.items())
        # A backend that exited during the measure is in the root's reaped time.
        machine = MachineCpu.read() - self._machine
        return CpuShares(
            wall,
            server / wall,
            max(postgres, 0.0) / wall,
            client / wall,
            machine.processes / wall,
            machine.interrupts / wall,
            machine.steal / wall,
        )


@dataclass(slots=True)
class RssSamples:
    """VmRSS of a process over time, in kB, with the peak the kernel saw."""

    samples: list[tuple[float, int]]  # (seconds since start, kB)
    peak_kb: int  # VmHWM since the sampler started (or the largest sample)

    @property
    def end_kb(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    @property
    def start_kb(self) -> int:
        return self.samples[0][1] if self.samples else 0

    def quarter_mean_kb(self, quarter: int) -> float:
        """Mean RSS over the `quarter`-th quarter (1-4) of the samples."""
        n = len(self.samples)
        part = [kb for _, kb in self.samples[(quarter - 1) * n // 4 : quarter * n // 4]] or [self.end_kb]
        return sum(part) / len(part)


class RssSampler:
    """Samples VmRSS of `pid` every `interval` seconds while running (`async with`)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self._samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._kernel_peak = False
        self._started = 0.0

    async def __aenter__(self) -> RssSampler:
        self._kernel_peak = reset_peak_rss(self.pid)
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        self._sample()

    def result(self) -> RssSamples:
        largest = max((kb for _, kb in self._samples), default=0)
        peak = max(status_kb(self.pid, "VmHWM"), largest) if self._kernel_peak else largest
        return RssSamples(list(self._samples), peak)

    def _sample(self) -> None:
        self._samples.append((time.monotonic() - self._started, status_kb(self.pid, "VmRSS")))

    async def _run(self) -> None:
        while True:  # cancelled by __aexit__
            self._sample()
            await asyncio.sleep(self.interval)
