"""An embedded PostgreSQL (the `pgserver` wheel) for running without a database URL.

Meant for development and demos: the data lives in `<data_dir>/postgres`, the
server listens on a unix socket only, and it is stopped when the service stops.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """Starts and stops one pgserver instance. The methods block (initdb and
    pg_ctl are subprocesses); call them in a thread from async code."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.expanduser().resolve() / "postgres"
        self._server: Any = None  # pgserver.PostgresServer (untyped)

    def start(self) -> str:
        """Initializes the data directory if needed, starts PostgreSQL and
        returns its connection URI."""
        # pgserver asks platformdirs for a runtime dir it does not use here;
        # on machines without XDG_RUNTIME_DIR that only prints a warning.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        # Imported lazily: only needed without a database URL.
        from pgserver.postgres_server import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        # pgserver is chatty at INFO (every pg_ctl command line); keep ours only.
        logging.getLogger("pgserver").setLevel(max(logging.WARNING, logging.getLogger().level))
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        uri: str = self._server.get_uri()
        _log.info("started embedded PostgreSQL in %s", self.pgdata)
        return uri

    def stop(self) -> None:
        """Stops PostgreSQL (keeping its data)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.cleanup()
        _log.info("stopped embedded PostgreSQL")
