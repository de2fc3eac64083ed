"""Argument parsing for the `interactions` command: argparse, with the CLI's
own wording for usage errors (raised as UsageError, exit 2) and checked value
types for options that take numbers, times and targets."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import datetime
from typing import NoReturn

from interactions_client.cli._errors import UsageError

# argparse's messages (Python 3.11 to 3.13) -> ours. Anything not matched keeps
# argparse's text without its "argument X:" prefix.
_REQUIRED = re.compile(r"the following arguments are required: (?P<names>.*)")
_CHOICE = re.compile(r"argument (?P<name>\S+): invalid choice: '?(?P<value>[^'(]*?)'? \(choose from (?P<choices>.*)\)")
_CONVERSION = re.compile(r"argument (?P<name>\S+): invalid (?P<kind>\w+) value: (?P<value>.*)")
_ONE_VALUE = re.compile(r"argument (?P<name>\S+): expected one argument")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<rest>.*)")
_ARGUMENT = re.compile(r"argument (?P<name>\S+): (?P<rest>.*)")

_KINDS = {"int": "a whole number", "float": "a number"}


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError in the CLI's words instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self._wording(message), command=self.prog)

    def _wording(self, message: str) -> str:
        if (m := _CHOICE.fullmatch(message)) and m["name"] == "COMMAND":
            return f"unknown command '{m['value']}' (commands: {self._commands()})"
        if m := _CHOICE.fullmatch(message):
            return f"{m['name']}: '{m['value']}' is not one of {m['choices'].replace(chr(39), '')}"
        if m := _REQUIRED.fullmatch(message):
            if m["names"] == "COMMAND":
                return f"no command given (commands: {self._commands()})"
            names = m["names"].split(", ")
            return f"missing {' and '.join(names)}" if len(names) <= 2 else f"missing {', '.join(names)}"
        if m := _CONVERSION.fullmatch(message):
            return f"{m['name']}: {m['value']} is not {_KINDS.get(m['kind'], 'valid')}"
        if m := _ONE_VALUE.fullmatch(message):
            return f"{m['name']} needs a value"
        if m := _UNRECOGNIZED.fullmatch(message):
            rest = m["rest"]
            return f"unknown option {rest}" if rest.startswith("-") else f"unexpected argument {rest}"
        if m := _ARGUMENT.fullmatch(message):
            return f"{m['name']}: {m['rest']}"
        return message

    def _commands(self) -> str:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return ", ".join(action.choices)
        return ""


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None


def count(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number from `low` (to `high`), as an argparse type."""

    def check(text: str) -> int:
        value = whole_number(text)
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range (give a number {bounds})")
        return value

    return check


def seconds(text: str) -> float:
    """A duration in seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds above 0")
    return value


def moment(text: str) -> datetime:
    """ISO 8601 with a UTC offset (`Z` or `+01:00`): a time without one would be read as UTC by protobuf."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an ISO 8601 time (e.g. 2026-03-01T10:00:00+01:00)") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"'{text}' has no UTC offset (add Z or e.g. +01:00)")
    return value


_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


def target(text: str) -> str:
    """HOST:PORT ([::1]:PORT for IPv6), or a gRPC target URI such as unix:/path or dns:///host:port."""
    if text.startswith(_SCHEMES):
        return text
    host, colon, port = text.rpartition(":")
    wrong = f"'{text}' is not HOST:PORT"
    if not colon or not host or any(c.isspace() for c in text) or "/" in text:
        raise argparse.ArgumentTypeError(f"{wrong} (e.g. localhost:50051)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{wrong}: the port must be from 1 to 65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"{wrong}: write an IPv6 address in brackets, e.g. [::1]:50051")
    return text


# The ids a command names (USER, SESSION): documented as options, --user USER
# and --session SESSION, as `log` takes them; also taken as the positional
# arguments the reading commands had before (`cart USER`, `session USER
# SESSION`), in that order, so that scripts written for those keep working.
_POSITIONAL = "positional_"


def add_ids(parser: argparse.ArgumentParser, *names: str) -> None:
    """--NAME NAME for each of `names`, and the old positional spelling (hidden from --help)."""
    for name in names:
        parser.add_argument(f"--{name}", metavar=name.upper(), help=f"the {name} id")
    for name in names:
        parser.add_argument(_POSITIONAL + name, nargs="?", metavar=name.upper(), help=argparse.SUPPRESS)


def resolve_ids(args: argparse.Namespace, command: str) -> None:
    """Puts each id of add_ids, given either way, in args.NAME; a usage error
    when one is missing or given twice with different values."""
    for key in [k for k in vars(args) if k.startswith(_POSITIONAL)]:
        name, positional = key.removeprefix(_POSITIONAL), getattr(args, key)
        option, metavar = getattr(args, name), name.upper()
        delattr(args, key)
        if option is not None and positional is not None and option != positional:
            raise UsageError(f"{metavar} given twice ({positional} and --{name} {option})", command=command)
        if option is None and positional is None:
            raise UsageError(f"missing {metavar} (--{name} {metavar})", command=command)
        setattr(args, name, option if option is not None else positional)
