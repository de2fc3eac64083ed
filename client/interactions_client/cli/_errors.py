"""How the `interactions` command reports a failure: the exit status, one
line on stderr, and with --json the same error as an object on stdout:

    {"error": {"code": "INVALID_ARGUMENT", "message": "...", "violations": [{"field": "...", "description": "..."}]}}

`code` is the gRPC status name when the server (or the channel) answered,
"USAGE" for a command line the CLI cannot act on, "FILE_ERROR" for a file
that cannot be read or written, and INVALID_ARGUMENT for an event that
pre-validation refused before sending it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from interactions_client.errors import DeliveryFailedError, InteractionsError, InvalidArgumentError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REJECTED_LINES = 3


class UsageError(Exception):
    """A command line the CLI cannot act on (exit 2). `command` is the program
    and command it concerns, e.g. "interactions log", for the --help hint."""

    def __init__(self, message: str, *, command: str = "interactions") -> None:
        super().__init__(message)
        self.message = message
        self.command = command


def exit_status(error: BaseException) -> int:
    return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILED


def error_object(error: BaseException) -> dict[str, Any]:
    """`{"error": {...}}` for the failures main() reports (see the module docstring)."""
    body: dict[str, Any] = {"code": _code(error), "message": _message(error)}
    if isinstance(error, InvalidArgumentError):
        body["violations"] = [{"field": v.field, "description": v.description} for v in error.violations]
    return {"error": body}


def describe(error: BaseException) -> str:
    """The stderr text: one line, then one line per violation."""
    if isinstance(error, UsageError):
        return f"{error.command}: error: {error.message}\n(see `{error.command} --help`)\n"
    lines = [f"error: {_message(error)}\n"]
    if isinstance(error, InvalidArgumentError):
        lines += [f"  {v.field}: {v.description}\n" for v in error.violations]
    return "".join(lines)


def report(error: BaseException, *, as_json: bool, fields: dict[str, Any] | None = None) -> int:
    """Reports `error` (stderr always; stdout too with --json, merged into `fields`) and returns the exit status."""
    sys.stderr.write(describe(error))
    if as_json:
        sys.stdout.write(json.dumps({**(fields or {}), **error_object(error)}, ensure_ascii=False) + "\n")
    return exit_status(error)


def _code(error: BaseException) -> str:
    if isinstance(error, UsageError):
        return "USAGE"
    if isinstance(error, DeliveryFailedError) and isinstance(error.cause, InteractionsError):
        error = error.cause  # why the streamer gave up
    if isinstance(error, InteractionsError):
        if error.code is not None:
            return str(error.code.name)
        if isinstance(error, InvalidArgumentError):
            return "INVALID_ARGUMENT"  # refused by pre-validation, nothing sent
        return "DELIVERY_FAILED" if isinstance(error, DeliveryFailedError) else "FAILED"
    if isinstance(error, OSError):
        return "FILE_ERROR"
    return "FAILED"


def _message(error: BaseException) -> str:
    if isinstance(error, UsageError):
        return error.message
    if isinstance(error, InvalidArgumentError):
        return error.reason  # the violations are listed separately
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return str(error)
