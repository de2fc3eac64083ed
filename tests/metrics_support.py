"""Reading /metrics in tests: scrapes parsed into {(name, labels): value}."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(url: str) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body.decode()

    return parse(await asyncio.to_thread(get))


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly `labels` (0 when absent, as for a counter not yet moved)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`."""
    wanted = labels.items()
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= dict(ls).items())


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def moved(after: Samples, before: Samples, prefix: str) -> Mapping[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples starting with `prefix` that changed, with their change."""
    return {
        key: v - before.get(key, 0.0)
        for key, v in after.items()
        if key[0].startswith(prefix) and v != before.get(key, 0.0)
    }
