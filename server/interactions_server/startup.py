"""Start-up checks, and the errors an operator can act on.

A `StartupError` is a configuration or environment problem (a port in use, a
database that does not exist, a wrong password, an unreadable certificate...):
`interactions-server` prints its message as one line and exits with status 2,
without a traceback. The message says what is wrong and what to do.
"""

from __future__ import annotations

import socket
import urllib.parse

import asyncpg

EXIT_OPERATOR_ERROR = 2  # also argparse's status for a usage error
EXIT_DATABASE_DIED = 3  # the embedded PostgreSQL exited under the server


class StartupError(Exception):
    """The server cannot start for a reason an operator can act on."""


def split_listen(listen: str) -> tuple[str, int]:
    """("host", port) of a HOST:PORT listen address; "[::]" becomes "::"."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise StartupError(f"invalid listen address {listen!r}: expected HOST:PORT, e.g. [::]:50051 or 127.0.0.1:0")
    return host.strip("[]") or "::", int(port)


def check_port_free(listen: str) -> None:
    """Fails when another program listens on `listen`'s port.

    Binds a probe socket without SO_REUSEPORT, so that it also fails against
    a program sharing its port (the workers of another interactions-server).
    Port 0 is left to the caller. Run before anything slow starts (the
    embedded database), so that a busy port is reported at once.
    """
    host, port = split_listen(listen)
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {listen}: unknown host {host!r} ({exc.strerror}); fix --listen") from exc
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # Like gRPC: a port whose old connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {listen}: {exc.strerror.lower() if exc.strerror else exc}; "
                    "stop the program using it or choose another --listen"
                ) from exc


def reserve_port(listen: str) -> str:
    """`listen` with port 0 replaced by a port that is free now (the workers
    of a supervisor must all bind the same port)."""
    host, port = split_listen(listen)
    if port != 0:
        return listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        free: int = probe.getsockname()[1]
    return f"{listen.rpartition(':')[0]}:{free}"


def describe_database(dsn: str) -> str:
    """The database a URL points at, without its password: "user@host:port/name"."""
    try:
        url = urllib.parse.urlsplit(dsn)
        query = urllib.parse.parse_qs(url.query)
        host = url.hostname or query.get("host", ["localhost"])[0]
        where = f"{host}:{url.port}" if url.port else host
        user = f"{url.username}@" if url.username else ""
        return f"{user}{where}{url.path or '/'}"
    except ValueError:
        return "the --database-url"


def database_error(exc: BaseException, dsn: str) -> StartupError | None:
    """The operator's version of a failure to connect to `dsn`, or None when
    `exc` is not one (a bug, or a database that is only unreachable for now)."""
    target = describe_database(dsn)
    database = urllib.parse.urlsplit(dsn).path.lstrip("/") if "://" in dsn else ""
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return StartupError(
            f"database {database or '(default)'!r} does not exist ({target}): "
            f"create it (createdb {database}) or fix --database-url"
        )
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return StartupError(f"the database refused the password ({target}): fix the user or password in --database-url")
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        # A role that does not exist, or pg_hba.conf refusing this host or user.
        return StartupError(f"the database refused the login ({target}): {exc}; fix the role in --database-url")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return StartupError(f"the database role lacks a privilege ({target}): {exc}; grant it or use another role")
    if isinstance(exc, ValueError):  # asyncpg's DSN parsing (ClientConfigurationError is one too)
        return StartupError(f"invalid --database-url: {exc}; expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    return None


def unreachable_database(exc: BaseException, dsn: str, waited: float) -> StartupError:
    """The database did not answer within the start-up timeout."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    return StartupError(
        f"cannot reach the database at {describe_database(dsn)} after {waited:.0f} s ({reason}): "
        "check that PostgreSQL is running there and --database-url"
    )
