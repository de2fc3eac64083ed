"""The Citus suite: acceptance tests of the service run against a real Citus
cluster (a coordinator and two workers on loopback, started by
scripts/citus-cluster from the Citus installed into the PostgreSQL at
CITUS_PG_BIN, default /usr/lib/postgresql/15/bin) and the checks that only a
cluster can answer (distribution, router queries, a worker refused).

Every test here carries the `citus` marker and runs only when asked for:
`scripts/test -m citus`. Without Citus installed the suite is skipped with one
line saying how to get it. INTERACTIONS_TEST_CITUS_URL names the coordinator
of a running cluster to use instead (its database is distributed and emptied).

The fixtures of tests/conftest.py work here unchanged, on the cluster:
`migrated_database_url` is the cluster's database after `distribute`, so
`database_url`, `server`, `start_server` and the stubs serve it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.citus import free_ports
from interactions_server.config import ServerConfig
from interactions_server.storage import distribute

CITUS_DIR = Path(__file__).parent
CLUSTER_SCRIPT = CITUS_DIR.parents[1] / "scripts" / "citus-cluster"
SHARDS = 4  # the advice of docs/scaling.md for two workers of this machine


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks the tests of this directory `citus`; leaves them out unless `-m` names citus."""
    ours = [item for item in items if CITUS_DIR in Path(item.path).parents]
    for item in ours:
        item.add_marker(pytest.mark.citus)
    if ours and "citus" not in str(config.getoption("markexpr", "")):
        config.hook.pytest_deselected(items=ours)
        chosen = set(map(id, ours))
        items[:] = [item for item in items if id(item) not in chosen]


class Cluster:
    def __init__(self, url: str, directory: Path | None) -> None:
        self.url = url
        self.directory = directory

    def node_url(self, offset: int) -> str:
        """The URL of the node at the coordinator's port + offset (1, 2: the workers)."""
        parts = urllib.parse.urlsplit(self.url)
        assert parts.port is not None
        return parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port + offset}").geturl()


@pytest.fixture(scope="session")
def citus_cluster() -> Iterator[Cluster]:
    url = os.environ.get("INTERACTIONS_TEST_CITUS_URL")
    if url:
        yield Cluster(url, None)
        return
    directory = Path(tempfile.mkdtemp(prefix="interactions-citus-"))
    args = ["--dir", str(directory), "--port", str(free_ports(3)), "--shards", str(SHARDS)]
    args += ["--conf", "citus.max_cached_conns_per_worker = 16"]
    try:
        done = subprocess.run([str(CLUSTER_SCRIPT), "start", *args], capture_output=True, text=True, timeout=300)
        if done.returncode == 3:  # Citus is not installed: the one line says how to get it
            pytest.skip(done.stderr.strip().splitlines()[-1])
        assert done.returncode == 0, done.stderr
        yield Cluster(done.stdout.strip().splitlines()[-1], directory)
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop", *args], capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
async def migrated_database_url(citus_cluster: Cluster) -> str:
    """The cluster's database, migrated and distributed by `distribute` itself."""
    await distribute(ServerConfig(), citus_cluster.url, None)
    return citus_cluster.url
