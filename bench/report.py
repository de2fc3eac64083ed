"""The results of a run: the table of measures against their targets, the CPU
each measure used, and the same as JSON."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.analytics import AnalyticsResults, QueryLatency
from bench.identity import LinkLatency
from bench.late_events import LateEvents
from bench.measures import BusyLatency, CallLatency, InlineLatency, Latency, Memory, Profile, Throughput
from bench.proc_stats import RssSamples
from bench.recommendations import RecsResults
from bench.retention import RetentionBeside
from bench.subscribe import SUBSCRIBERS, SubscriptionResults

MB = 1024.0  # kB per MB
SUBSCRIBERS_TEXT = str(SUBSCRIBERS)
RSS_LIMIT_MB = 250.0
FLAT_GROWTH = 0.10  # RSS in the last quarter at most 10% above the second quarter


@dataclass(slots=True)
class Results:
    """Everything a run measured; a field stays None when its measure did not run."""

    ceiling: Throughput | None = None  # (a): COPY into the log's tables (events and event_keys)
    ceiling_events_only: Throughput | None = None  # (a), for reference: COPY into events alone
    bulk: Throughput | None = None  # (b)
    rpc_ceiling: Throughput | None = None  # (c)
    unary: Throughput | None = None  # (d)
    latency: Latency | None = None  # (d)
    memory: Memory | None = None  # (e)
    growth: Throughput | None = None  # (f)
    preload_rows: int = 0
    preload_seconds: float = 0.0
    fanout: dict[int, Throughput] = field(default_factory=dict)  # (g)
    analytics: AnalyticsResults | None = None  # (h), (i), (j)
    busy: BusyLatency | None = None  # (k)
    inline: list[InlineLatency] = field(default_factory=list)  # (k2), one per server set-up
    late: LateEvents | None = None  # (l)
    link: LinkLatency | None = None  # (m)
    retention: RetentionBeside | None = None  # (n)
    recommendations: RecsResults | None = None  # (r)
    subscription: SubscriptionResults | None = None  # (s)
    profiles: dict[str, Profile] = field(default_factory=dict)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    skipped: dict[str, str] = field(default_factory=dict)  # measure -> why
    code: str = ""  # the commit measured, and whether the working tree differed
    profiled: bool = False  # py-spy and pg_stat_activity sampling ran during (b), (d) and (k)
    repeat: int = 1  # runs of each throughput measure, the best kept
    callers: int = 64  # concurrent unary callers
    workers: int = 1  # the server's --workers
    connections: int = 1  # client connections per load process
    prevalidate: bool = True  # the bulk streams' client pre-validated
    pg_defaults: bool = False  # PostgreSQL ran with its own defaults, not the embedded server's machine settings
    server_args: tuple[str, ...] = ()  # extra arguments the server ran with


@dataclass(frozen=True, slots=True)
class Row:
    key: str  # the measure's letter
    measure: str
    value: str
    ratio: str = ""
    target: str = ""
    met: bool | None = None  # None: no target
    void: str = ""  # why the figure cannot be trusted (failed events, errors)
    noise: float | None = None  # cores used outside the benchmark during the figure's run(s)

    @property
    def met_text(self) -> str:
        if self.void:
            return "VOID"
        return "" if self.met is None else ("yes" if self.met else "NO")

    @property
    def noise_text(self) -> str:
        return "" if self.noise is None else f"{self.noise:.2f}"


def _noise(*figures: Throughput | None) -> float | None:
    """Cores taken by other processes and other machines during these figures' runs (the worst)."""
    found = [f.cpu.other + f.cpu.steal for f in figures if f is not None]
    return max(found) if found else None


def _ratio(value: float, ceiling: Throughput | None, of: str) -> tuple[str, float | None]:
    if ceiling is None or ceiling.rate <= 0:
        return "", None
    ratio = value / ceiling.rate
    return f"{ratio:.2f} of {of}", ratio


def _void(*figures: Throughput | None) -> str:
    problems = [f for f in figures if f is not None and f.problems]
    return "; ".join(f"{f.problems} failed/rejected: {'; '.join(f.errors)}" for f in problems)


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def _size(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


def _met(ratio: float | None, at_least: float) -> bool | None:
    return None if ratio is None else ratio >= at_least


def rows(results: Results) -> list[Row]:
    out: list[Row] = []
    a, b, c, d = results.ceiling, results.bulk, results.rpc_ceiling, results.unary
    callers = f"{results.callers} callers"
    if a is not None:
        what = "the log's table + keys" if a.with_keys else "a table like the log"
        out.append(Row("a", f"(a) DB ceiling: COPY into {what}", f"{a.rate:,.0f} rows/s", "1.00", noise=_noise(a)))
        if (ae := results.ceiling_events_only) is not None and a.with_keys:
            text, _ = _ratio(ae.rate, a, "(a)")
            out.append(
                Row("a", "(a) reference: COPY into events alone", f"{ae.rate:,.0f} rows/s", text, noise=_noise(ae))
            )
    if b is not None:
        text, ratio = _ratio(b.rate, a, "(a)")
        target = ">= 0.6 of (a) (aim 0.8)"
        out.append(
            Row(
                "b",
                "(b) bulk StreamEvents, 1 stream",
                f"{b.rate:,.0f} events/s",
                text,
                target,
                _met(ratio, 0.6),
                _void(b),
                _noise(a, b),
            )
        )
    if c is not None:
        out.append(
            Row(
                "c",
                f"(c) RPC ceiling: no-op LogEvent, {callers}",
                f"{c.rate:,.0f} calls/s",
                "1.00",
                void=_void(c),
                noise=_noise(c),
            )
        )
    if c is not None:
        out.append(Row("c", "(c) CPU per call", _per_call(c), void=_void(c), noise=_noise(c)))
    if d is not None:
        text, ratio = _ratio(d.rate, c, "(c)")
        out.append(
            Row(
                "d",
                f"(d) LogEvent, {callers}",
                f"{d.rate:,.0f} calls/s",
                text,
                ">= 0.8 of (c)",
                _met(ratio, 0.8),
                _void(d),
                _noise(c, d),
            )
        )
    if d is not None:
        out.append(Row("d", "(d) CPU per call", _per_call(d, postgres=True), void=_void(d), noise=_noise(d)))
    if (lat := results.latency) is not None:
        where = f"at {lat.rate:,.0f} calls/s (half max)"
        run = lat.throughput
        out.append(Row("d", f"(d) LogEvent p50 {where}", _ms(lat.p50), void=_void(run), noise=_noise(run)))
        out.append(
            Row(
                "d",
                f"(d) LogEvent p99 {where}",
                _ms(lat.p99),
                target="<= 10 ms",
                met=lat.p99 <= 0.010,
                void=_void(run),
                noise=_noise(run),
            )
        )
    if (mem := results.memory) is not None:
        run, rss = mem.throughput, mem.rss
        size = f"{_size(run.count)}-event stream"
        note = "" if run.count >= 2_000_000 else " (for 2M)"
        q2, q4 = rss.quarter_mean_kb(2), rss.quarter_mean_kb(4)
        growth = (q4 - q2) / q2 if q2 else 0.0
        void, noise = _void(run), _noise(run)
        out.append(
            Row(
                "e",
                f"(e) server RSS peak, {size}",
                f"{rss.peak_kb / MB:.0f} MB",
                target=f"< {RSS_LIMIT_MB:.0f} MB{note}",
                met=rss.peak_kb / MB < RSS_LIMIT_MB,
                void=void,
                noise=noise,
            )
        )
        out.append(
            Row(
                "e",
                f"(e) server RSS at end, {size}",
                f"{rss.end_kb / MB:.0f} MB (start {rss.start_kb / MB:.0f})",
                void=void,
                noise=noise,
            )
        )
        out.append(
            Row(
                "e",
                "(e) RSS last quarter vs second quarter",
                f"{(q4 - q2) / MB:+.1f} MB ({growth:+.1%})",
                target=f"flat (<= +{FLAT_GROWTH:.0%})",
                met=growth <= FLAT_GROWTH,
                void=void,
                noise=noise,
            )
        )
    if (f := results.growth) is not None:
        text, ratio = _ratio(f.rate, b, "(b)")
        note = "" if results.preload_rows >= 10_000_000 else " (for 10M)"
        out.append(
            Row(
                "f",
                f"(f) bulk with {_size(results.preload_rows)} rows in the log",
                f"{f.rate:,.0f} events/s",
                text,
                f">= 0.8 of (b){note}",
                _met(ratio, 0.8),
                _void(f),
                _noise(b, f),
            )
        )
    for streams, g in results.fanout.items():
        text, _ = _ratio(g.rate, a, "(a)")
        label = f"(g) fan-out {streams} stream{'s' if streams > 1 else ''}, {g.processes} client proc."
        out.append(Row("g", label, f"{g.rate:,.0f} events/s", text, void=_void(g), noise=_noise(a, g)))
    if results.analytics is not None:
        out.extend(analytics_rows(results.analytics))
    if (k := results.busy) is not None:
        out.extend(busy_rows(k, b))
    for inline in results.inline:
        out.extend(inline_rows(inline))
    if (late := results.late) is not None:
        out.extend(late_rows(late))
    if (link := results.link) is not None:
        out.extend(link_rows(link))
    if (kept := results.retention) is not None:
        out.extend(retention_rows(kept, results.bulk))
    if (recs := results.recommendations) is not None:
        out.extend(recs_rows(recs))
    if (sub := results.subscription) is not None:
        out.extend(subscription_rows(sub))
    for key, why in results.skipped.items():
        out.append(Row(key, f"({key}) skipped", why))
    return out


def _quarter_growth(rss: RssSamples) -> float:
    """RSS in the last quarter of the samples against the second."""
    q2, q4 = rss.quarter_mean_kb(2), rss.quarter_mean_kb(4)
    return (q4 - q2) / q2 if q2 else 0.0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def _per_event_us(run: Throughput, cores: float) -> float:
    return cores * run.cpu.wall_seconds / max(run.count, 1) * 1e6


def subscription_rows(sub: SubscriptionResults) -> list[Row]:
    """(s): the medians of the interleaved runs, with every run's rate (the spread is the noise)."""
    out: list[Row] = []
    base = sub.variants.get("no xid column", [])
    base_rate = _median([r.rate for r in base])
    for variant, runs in sub.variants.items():
        rate = _median([r.rate for r in runs])
        spread = ", ".join(f"{r.rate / 1000:.1f}k" for r in runs)
        pg = _median([_per_event_us(r, r.cpu.postgres) for r in runs])
        server = _median([_per_event_us(r, r.cpu.server) for r in runs])
        wal = _median([r.wal_bytes / max(r.count, 1) for r in runs])
        out.append(
            Row(
                "s",
                f"(s) (b) {variant}",
                f"{rate:,.0f} events/s (runs {spread}); PostgreSQL {pg:.1f} µs/ev, server {server:.1f} µs/ev, WAL {wal:,.0f} B/ev",
                f"{rate / base_rate:.2f} of no xid" if base_rate > 0 else "",
                void=_void(*runs),
                noise=_noise(*runs),
            )
        )
    if sub.pairs:
        ratios = [with_.rate / alone.rate for alone, with_ in sub.pairs if alone.rate > 0]
        ratio = _median(ratios)
        value = "; ".join(f"{alone.rate / 1000:.1f}k -> {with_.rate / 1000:.1f}k" for alone, with_ in sub.pairs)
        out.append(
            Row(
                "s",
                f"(s) (b) with {SUBSCRIBERS_TEXT} subscribers attached, in pairs",
                value,
                f"{ratio:.2f} of without (pairs {', '.join(f'{r:.2f}' for r in ratios)})",
                ">= 0.8 of without",
                ratio >= 0.8,
                _void(*(r for pair in sub.pairs for r in pair)),
                _noise(*(r for pair in sub.pairs for r in pair)),
            )
        )
    for d in sub.delivery:
        out.append(
            Row(
                "s",
                f"(s) commit -> delivery, {d.subscribers} subscriber(s), ingest at {d.rate:,.0f}/s (half of (b))",
                f"p50 {_ms(d.p50)}, p99 {_ms(d.p99)}, max {_ms(d.max)} (from send p99 {_ms(d.from_send_p99)}; "
                f"{d.events:,} events, {d.missing} missing)",
                target="p99 <= 100 ms (aim 20)",
                met=d.p99 <= 0.100 and d.missing == 0,
            )
        )
    if (slow := sub.slow) is not None:
        rss = slow.rss
        growth = _quarter_growth(rss)
        out.append(
            Row(
                "s",
                f"(s) server RSS, a consumer at {slow.read_rate:,.0f}/s, ingest {slow.ingest_rate:,.0f}/s, {slow.seconds:.0f} s",
                f"start {rss.start_kb / MB:.0f} MB, peak {rss.peak_kb / MB:.0f}, end {rss.end_kb / MB:.0f}; "
                f"last vs second quarter {growth:+.1%}",
                target=f"flat (<= +{FLAT_GROWTH:.0%})",
                met=growth <= FLAT_GROWTH,
            )
        )
    return out


def analytics_rows(results: AnalyticsResults) -> list[Row]:
    out: list[Row] = []
    size = _size(results.events)
    copy, export = results.export_ceiling, results.export
    if copy is not None:
        noise = copy.cpu.other + copy.cpu.steal
        out.append(
            Row("h", f"(h) COPY (export query) TO STDOUT, {size} rows", f"{copy.rate:,.0f} rows/s", "1.00", noise=noise)
        )
    if export is not None:
        ratio = export.rate / copy.rate if copy is not None and copy.rate else None
        out.append(
            Row(
                "h",
                f"(h) ExportEvents through the client, {size} rows",
                f"{export.rate:,.0f} rows/s",
                "" if ratio is None else f"{ratio:.2f} of COPY",
                ">= 0.5 of COPY",
                _met(ratio, 0.5) if ratio is not None else None,
                noise=max(r.cpu.other + r.cpu.steal for r in (copy, export) if r is not None),
            )
        )
    if (training := results.training) is not None:
        out.append(
            Row(
                "i",
                f"(i) ExportTrainingData, {size} events",
                f"{training.seconds:.1f} s ({training.rows:,} pairs, {training.rows / training.seconds:,.0f}/s)",
                noise=training.cpu.other + training.cpu.steal,
            )
        )
        rss = training.rss
        growth = _quarter_growth(rss)
        out.append(
            Row(
                "i",
                "(i) server RSS during the export",
                f"peak {rss.peak_kb / MB:.0f} MB (start {rss.start_kb / MB:.0f}; last vs second quarter {growth:+.1%})",
                target=f"flat (<= +{FLAT_GROWTH:.0%})",
                met=growth <= FLAT_GROWTH,
            )
        )
    note = "" if results.events >= 1_000_000 else " (at 1M)"
    latencies: list[tuple[str, QueryLatency | None]] = [
        ("TopSearchQueries", results.top_searches),
        ("CountActiveUsers", results.active_users),
    ]
    for name, latency in latencies:
        if latency is not None:
            out.append(
                Row(
                    "j",
                    f"(j) {name}, 7 days of a {size}-event log",
                    f"p50 {_ms(latency.p50)}, max {_ms(latency.max)}",
                    target=f"< 1 s{note}",
                    met=latency.max < 1.0,
                )
            )
    return out


def busy_rows(k: BusyLatency, b: Throughput | None) -> list[Row]:
    where = f"at {k.rate:,.0f} calls/s during a bulk stream"
    void, noise = _void(k.bulk, k.unary), _noise(k.bulk)
    enough = k.calls >= 100  # fewer: the stream was too short for a p99 (give --busy-events more)
    sample = f"{k.calls:,} calls" if enough else f"only {k.calls} calls: too few"
    text, _ = _ratio(k.bulk.rate, b, "(b)")
    return [
        Row("k", f"(k) LogEvent p50 {where}", _ms(k.p50), void=void, noise=noise),
        Row(
            "k",
            f"(k) LogEvent p99 {where}",
            f"{_ms(k.p99)} ({sample})",
            target="<= 20 ms (aim 10)",
            met=k.p99 <= 0.020 if enough else None,
            void=void,
            noise=noise,
        ),
        Row("k", f"(k) LogEvent max {where}", _ms(k.max), void=void, noise=noise),
        Row("k", "(k) the bulk stream meanwhile", f"{k.bulk.rate:,.0f} events/s", text, void=void, noise=noise),
    ]


def _per_call(t: Throughput, *, postgres: bool = False) -> str:
    """CPU µs per call or event: the server's, PostgreSQL's, the clients'."""

    def us(cores: float) -> str:
        return f"{cores * t.cpu.wall_seconds / max(t.count, 1) * 1e6:,.0f} µs"

    parts = [f"server {us(t.cpu.server)}"]
    if postgres:
        parts.append(f"PostgreSQL {us(t.cpu.postgres)}")
    parts.append(f"client {us(t.cpu.client)}")
    return ", ".join(parts)


def inline_rows(k: InlineLatency) -> list[Row]:
    setup = f"{k.workers} worker{'s' if k.workers > 1 else ''}, {k.connections} conn."
    runs = (k.alone.run, k.beside.run, k.stream_solo, k.stream_beside)
    void, noise = _void(*runs), _noise(*runs)
    at = f"at {k.rate:,.0f}/s (1/4 of {k.max_rate:,.0f})"

    def figures(c: CallLatency) -> str:
        return f"p50 {_ms(c.p50)}, p99 {_ms(c.p99)}, max {_ms(c.max)} ({c.calls:,} calls)"

    enough = k.beside.calls >= 100
    floor = min(3 * k.alone.p99, 0.025)
    stream_ratio = k.stream_beside.rate / k.stream_solo.rate if k.stream_solo.rate else 0.0
    return [
        Row("k2", f"(k2) {setup}: LogEvent {at}, alone", figures(k.alone), void=void, noise=noise),
        Row(
            "k2",
            f"(k2) {setup}: LogEvent {at}, beside a stream",
            figures(k.beside),
            f"{k.beside.p99 / k.alone.p99:.1f}x alone p99" if k.alone.p99 > 0 else "",
            "p99 <= 3x alone, <= 25 ms (aim 2x, 10)",
            k.beside.p99 <= floor if enough else None,
            void,
            noise,
        ),
        Row(
            "k2",
            f"(k2) {setup}: the stream beside LogEvent",
            f"{k.stream_beside.rate:,.0f} events/s (alone {k.stream_solo.rate:,.0f})",
            f"{stream_ratio:.2f} of alone",
            ">= 0.5 of alone (aim 0.7)",
            stream_ratio >= 0.5,
            void,
            noise,
        ),
    ]


def late_rows(late: LateEvents) -> list[Row]:
    where = f"on a key with {_size(late.key_events)} events"
    void, noise = _void(late.run), _noise(late.run)
    return [
        Row("l", f"(l) late LogEvent p50 {where}", _ms(late.p50), void=void, noise=noise),
        Row(
            "l",
            f"(l) late LogEvent p99 {where}",
            f"{_ms(late.p99)} ({late.calls:,} calls)",
            target="<= 50 ms",
            met=late.p99 <= 0.050,
            void=void,
            noise=noise,
        ),
        Row("l", f"(l) late LogEvent max {where}", _ms(late.max), void=void, noise=noise),
        Row(
            "l",
            "(l) CPU per late LogEvent",
            f"server {late.server_ms_per_call:.1f} ms, PostgreSQL {late.postgres_ms_per_call:.1f} ms",
            void=void,
            noise=noise,
        ),
    ]


def link_rows(link: LinkLatency) -> list[Row]:
    what = f"(m) LinkIdentity, guest of {link.events_per_guest} events"
    void = f"{link.problems} links failed or moved another count" if link.problems else ""
    noise = link.cpu.other + link.cpu.steal
    enough = link.guests >= 100  # fewer: no p99 worth the name (give --link-guests more)
    sample = f"{link.guests:,} links" if enough else f"only {link.guests} links: too few"
    return [
        Row("m", f"{what}, p50", _ms(link.p50), void=void, noise=noise),
        Row(
            "m",
            f"{what}, p99",
            f"{_ms(link.p99)} ({sample})",
            target="<= 20 ms",
            met=link.p99 <= 0.020 if enough else None,
            void=void,
            noise=noise,
        ),
        Row("m", f"{what}, max", _ms(link.max), void=void, noise=noise),
    ]


def retention_rows(kept: RetentionBeside, alone: Throughput | None) -> list[Row]:
    void = "; ".join(filter(None, [_void(kept.run), *kept.errors[:3]]))
    text, ratio = _ratio(kept.run.rate, alone, "(b)")
    return [
        Row(
            "n",
            "(n) bulk beside a page_view retention",
            f"{kept.run.rate:,.0f} events/s",
            text,
            ">= 0.5 of (b)",
            _met(ratio, 0.5),
            void,
            _noise(alone, kept.run),
        ),
        Row(
            "n",
            "(n) the retention meanwhile",
            f"{kept.removed:,} of {kept.old_rows:,} rows in {kept.retention_seconds:.1f} s",
            f"{kept.overlap_seconds:.1f} s beside the stream",
            void=void,
            noise=_noise(kept.run),
        ),
    ]


def recs_rows(recs: RecsResults) -> list[Row]:
    per_user = {"RecentlyViewed", "UserAffinities"}
    out = [
        Row(
            "r",
            f"(r) maintainer catching up on {_size(recs.events)} preloaded rows",
            f"{recs.catch_up_seconds:.1f} s ({recs.events / max(recs.catch_up_seconds, 1e-9):,.0f} rows/s)",
        ),
        Row("r", "(r) VACUUM (ANALYZE) of the rebuilt aggregates, before the calls", f"{recs.vacuum_seconds:.1f} s"),
    ]
    for rpc in recs.rpcs:
        void = f"{rpc.errors} calls failed" if rpc.errors else ""
        noise = rpc.cpu.other + rpc.cpu.steal
        enough = rpc.calls >= 100  # fewer: no p99 worth the name (give --recs-calls more)
        sample = f"{rpc.calls:,} calls, {rpc.nonempty:,} non-empty" if enough else f"only {rpc.calls} calls: too few"
        limit = 0.010 if rpc.rpc in per_user else 0.020
        out += [
            Row("r", f"(r) {rpc.rpc} p50 at 50 calls/s", _ms(rpc.p50), void=void, noise=noise),
            Row(
                "r",
                f"(r) {rpc.rpc} p99 at 50 calls/s",
                f"{_ms(rpc.p99)} ({sample})",
                target=f"<= {limit * 1000:.0f} ms",
                met=rpc.p99 <= limit if enough else None,
                void=void,
                noise=noise,
            ),
            Row(
                "r",
                f"(r) {rpc.rpc} CPU per call",
                f"server {rpc.server_ms_per_call:.2f} ms, PostgreSQL {rpc.postgres_ms_per_call:.2f} ms",
                void=void,
                noise=noise,
            ),
        ]
    for fresh in recs.freshness:
        void = f"{fresh.missed} of {fresh.samples} never showed" if fresh.missed else ""
        out.append(
            Row(
                "r",
                f"(r) freshness {fresh.where} ({fresh.samples} samples), p50 / max",
                f"{fresh.p50:.2f} s / {fresh.max:.2f} s",
                target="<= 60 s",
                met=fresh.max <= 60.0 if fresh.samples else None,
                void=void,
            )
        )
    for label, stream in (
        ("(r) the bulk stream beside the freshness samples", recs.stream),
        ("(r) the same paced at half that rate", recs.half_stream),
    ):
        if stream is not None:
            out.append(Row("r", label, f"{stream.rate:,.0f} events/s", noise=stream.cpu.other + stream.cpu.steal))
    return out


def cpu_rows(results: Results) -> list[tuple[str, Throughput]]:
    named: list[tuple[str, Throughput | None]] = [
        ("(a) DB ceiling", results.ceiling),
        ("(b) bulk", results.bulk),
        ("(c) RPC ceiling", results.rpc_ceiling),
        ("(d) LogEvent max", results.unary),
        ("(d) LogEvent half max", results.latency.throughput if results.latency else None),
        ("(e) memory stream", results.memory.throughput if results.memory else None),
        ("(f) bulk, preloaded", results.growth),
        *((f"(g) {s} stream(s)", g) for s, g in results.fanout.items()),
        *_analytics_cpu(results.analytics),
        ("(k) bulk + LogEvent", results.busy.bulk if results.busy else None),
        *((f"(k2) {k.workers}w alone", k.alone.run) for k in results.inline),
        *((f"(k2) {k.workers}w beside", k.stream_beside) for k in results.inline),
        ("(l) late LogEvents", results.late.run if results.late else None),
        ("(n) bulk beside retention", results.retention.run if results.retention else None),
        *_subscription_cpu(results.subscription),
    ]
    return [(name, r) for name, r in named if r is not None]


def _subscription_cpu(sub: SubscriptionResults | None) -> list[tuple[str, Throughput]]:
    """The first run of each (s) variant and pair in the CPU table."""
    if sub is None:
        return []
    named = [(f"(s) {variant}", runs[0]) for variant, runs in sub.variants.items() if runs]
    if sub.pairs:
        named += [("(s) without subscribers", sub.pairs[0][0]), ("(s) with subscribers", sub.pairs[0][1])]
    return named


def _analytics_cpu(results: AnalyticsResults | None) -> list[tuple[str, Throughput]]:
    """(h) and (i) in the CPU table (the client is this process)."""
    if results is None:
        return []
    named = [
        ("(h) COPY TO STDOUT", results.export_ceiling),
        ("(h) ExportEvents", results.export),
        ("(i) ExportTrainingData", results.training),
    ]
    return [(name, Throughput(r.rows, r.seconds, r.cpu)) for name, r in named if r is not None]


def _table(header: list[str], body: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def render(results: Results) -> str:
    table = _table(
        ["measure", "value", "ratio", "target", "met?", "noise"],
        [[r.measure, r.value, r.ratio, r.target, r.met_text, r.noise_text] for r in rows(results)],
        {1, 5},
    )
    cpu = _table(
        ["CPU (cores busy)", "wall s", "server", "postgres", "client", "irq", "other", "steal", "WAL B/ev"],
        [
            [name, f"{t.cpu.wall_seconds:.1f}"]
            + [
                f"{v:.2f}"
                for v in (t.cpu.server, t.cpu.postgres, t.cpu.client, t.cpu.interrupts, t.cpu.other, t.cpu.steal)
            ]
            + [f"{t.wal_bytes / t.count:,.0f}"]
            for name, t in cpu_rows(results)
        ],
        {1, 2, 3, 4, 5, 6, 7, 8},
    )
    voids = [f"VOID {r.measure}: {r.void}" for r in rows(results) if r.void]
    profiled = (
        "PROFILED run: py-spy and pg_stat_activity sampling slowed (b), (d) and (k).\n" if results.profiled else ""
    )
    machine = (
        f"{profiled}code: {results.code}; server --workers {results.workers}, {results.connections} client "
        f"connection(s) per load process; streamer pre-validation {'on' if results.prevalidate else 'OFF'}; "
        f"PostgreSQL {'own defaults' if results.pg_defaults else 'sized for the machine (embedded_db)'}; throughputs: best of {results.repeat} run(s); "
        f"{'server args: ' + ' '.join(results.server_args) + '; ' if results.server_args else ''}"
        f"machine: {os.cpu_count()} cores; load average {results.load_before[0]:.2f} before, "
        f"{results.load_after[0]:.2f} after. CPU in cores (CPU s / wall s): irq = interrupt and softirq time (loopback "
        "networking), other = processes outside the benchmark, steal = taken by the hypervisor for other machines; "
        "other and steal are noise; WAL B/ev = WAL bytes written per row, event or call; a row's noise is their sum during its run(s) (and its ceiling's, the worst)."
    )
    return "\n\n".join(part for part in [table, cpu, machine, "\n".join(voids)] if part)


def to_json(results: Results) -> dict[str, Any]:
    def throughput(t: Throughput | None) -> dict[str, Any] | None:
        return None if t is None else {**asdict(t), "rate": t.rate, "cpu": {**asdict(t.cpu), "other": t.cpu.other}}

    memory = None
    if results.memory is not None:
        rss = results.memory.rss
        memory = {
            "stream": throughput(results.memory.throughput),
            "peak_kb": rss.peak_kb,
            "end_kb": rss.end_kb,
            "start_kb": rss.start_kb,
            "second_quarter_mean_kb": rss.quarter_mean_kb(2),
            "last_quarter_mean_kb": rss.quarter_mean_kb(4),
            "samples": rss.samples,
        }
    latency = None
    if (lat := results.latency) is not None:
        latency = {**{k: v for k, v in asdict(lat).items() if k != "throughput"}, "run": throughput(lat.throughput)}
    return {
        "code": results.code,
        "profiled": results.profiled,
        "repeat": results.repeat,
        "workers": results.workers,
        "connections": results.connections,
        "prevalidate": results.prevalidate,
        "pg_defaults": results.pg_defaults,
        "machine": {"cpu_count": os.cpu_count(), "load_before": results.load_before, "load_after": results.load_after},
        "rows": [{**asdict(r), "status": r.met_text} for r in rows(results)],
        "a_ceiling": throughput(results.ceiling),
        "a_ceiling_events_only": throughput(results.ceiling_events_only),
        "b_bulk": throughput(results.bulk),
        "c_rpc_ceiling": throughput(results.rpc_ceiling),
        "d_unary": throughput(results.unary),
        "d_latency": latency,
        "e_memory": memory,
        "f_growth": None
        if results.growth is None
        else {
            "preload_rows": results.preload_rows,
            "preload_seconds": results.preload_seconds,
            "run": throughput(results.growth),
        },
        "g_fanout": {str(s): throughput(g) for s, g in results.fanout.items()},
        "hij_analytics": None if results.analytics is None else asdict(results.analytics),
        "k_busy_latency": None
        if results.busy is None
        else {
            **{k: v for k, v in asdict(results.busy).items() if k not in ("bulk", "unary")},
            "bulk": throughput(results.busy.bulk),
            "unary": throughput(results.busy.unary),
        },
        "k2_inline_latency": [
            {
                "workers": k.workers,
                "connections": k.connections,
                "max_rate": k.max_rate,
                "rate": k.rate,
                **{
                    name: {"calls": c.calls, "p50": c.p50, "p99": c.p99, "max": c.max, "run": throughput(c.run)}
                    for name, c in (("alone", k.alone), ("beside", k.beside))
                },
                "stream_solo": throughput(k.stream_solo),
                "stream_beside": throughput(k.stream_beside),
            }
            for k in results.inline
        ],
        "server_args": list(results.server_args),
        "l_late_events": None
        if results.late is None
        else {
            **{k: v for k, v in asdict(results.late).items() if k != "run"},
            "server_ms_per_call": results.late.server_ms_per_call,
            "postgres_ms_per_call": results.late.postgres_ms_per_call,
            "run": throughput(results.late.run),
        },
        "m_link_latency": None if results.link is None else asdict(results.link),
        "n_retention_beside": None
        if results.retention is None
        else {
            **{k: v for k, v in asdict(results.retention).items() if k != "run"},
            "run": throughput(results.retention.run),
        },
        "r_recommendations": None if results.recommendations is None else asdict(results.recommendations),
        "s_subscription": None
        if results.subscription is None
        else {
            "variants": {v: [throughput(r) for r in runs] for v, runs in results.subscription.variants.items()},
            "pairs": [[throughput(a), throughput(b)] for a, b in results.subscription.pairs],
            "delivery": [asdict(d) for d in results.subscription.delivery],
            "slow": None if results.subscription.slow is None else asdict(results.subscription.slow),
        },
        "profiles": {name: asdict(p) for name, p in results.profiles.items()},
        "skipped": results.skipped,
    }
