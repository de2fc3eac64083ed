"""Bearer tokens with scopes: the tokens file and the auth interceptor.

The tokens file (TOML, `--auth-tokens`) holds one `[[token]]` table per
client: its `name` (shown in logs, never the secret), the hex `sha256` of
the secret, its `scopes` and optionally the `event_types` it may log. Each
call's `authorization: Bearer <token>` is hashed and compared, in constant
time, with every entry; the scope each RPC needs comes from the schema
(interactions_client.access). A refused call never reaches the servicer.

    python -m interactions_server.auth new    # a fresh random token and its sha256
    python -m interactions_server.auth hash   # the sha256 of a token read from stdin
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import inspect
import logging
import secrets
import sys
import tomllib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from interactions_client.access import ADMIN, ANY_TOKEN, GRANTABLE_SCOPES
from interactions_client.rules import RULES
from interactions_client.v1.event_pb2 import Event, FieldViolation
from interactions_server import metrics
from interactions_server.rpc import _handlers as handlers

_log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
_BEARER = "bearer "
# Probes carry no token: health stays open whatever the tokens file says.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
# Reflection needs any valid token. Any other method the scopes do not list
# (a service registered without its scopes: a bug) needs `admin`: fail closed.
ANY_TOKEN_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})
TYPE_NOT_ALLOWED = "not allowed for this client"
_EVENT_TYPE_NAMES = frozenset(rule.name for rule in RULES.values())
_TOKEN_KEYS = frozenset({"name", "sha256", "scopes", "event_types"})


class TokensFileError(Exception):
    """The tokens file cannot be read or is not valid; the message names the problem (never a hash)."""


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    digest: bytes  # SHA-256 of the secret
    scopes: frozenset[str]
    event_types: frozenset[str] | None  # None: every type

    def holds(self, scope: str) -> bool:
        return scope == ANY_TOKEN or scope in self.scopes or ADMIN in self.scopes


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes the current call: a token's name and the event types it may
    log; and its token's digest, to find it again after a reload."""

    name: str
    event_types: frozenset[str] | None
    digest: bytes = field(default=b"", repr=False)


# Set for the duration of each authenticated call. grpc.aio runs every call
# in its own task, and tasks copy the context, so calls never see each other's.
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("interactions_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the RPC being handled; None when tokens are off."""
    return _CALLER.get()


def allowed_event_types() -> frozenset[str] | None:
    """The event type names the current caller may log; None: any."""
    caller = _CALLER.get()
    return None if caller is None else caller.event_types


def event_type_violation(event: Event, allowed: frozenset[str] | None) -> FieldViolation | None:
    """The violation for an event whose type the caller may not log, else None.
    An unknown type is left to validation, which names it already."""
    if allowed is None or event.event_type not in RULES:
        return None
    if RULES[event.event_type].name in allowed:
        return None
    return FieldViolation(field="event_type", description=TYPE_NOT_ALLOWED)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


# --- the tokens file -----------------------------------------------------------


def load_tokens(path: Path) -> tuple[Token, ...]:
    """Reads and checks the tokens file; raises TokensFileError naming the problem."""
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise TokensFileError(f"cannot read the tokens file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TokensFileError(f"tokens file {path} is not valid TOML: {exc}") from None
    unknown = set(document) - {"token"}
    if unknown:
        raise TokensFileError(f"tokens file {path}: unknown top-level key(s) {sorted(unknown)}; expected [[token]]")
    entries = document.get("token")
    if not isinstance(entries, list) or not entries:
        raise TokensFileError(f"tokens file {path} has no [[token]] tables")
    tokens = tuple(_token(path, i, entry) for i, entry in enumerate(entries, 1))
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise TokensFileError(f"tokens file {path}: token name(s) {repeated} appear more than once")
    if len({t.digest for t in tokens}) != len(tokens):
        raise TokensFileError(f"tokens file {path}: two [[token]] tables have the same sha256")
    return tokens


def _token(path: Path, number: int, entry: object) -> Token:
    where = f"tokens file {path}, [[token]] #{number}"
    if not isinstance(entry, dict):
        raise TokensFileError(f"{where}: not a table")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TokensFileError(f"{where}: `name` is required (a non-empty string)")
    where = f"{where} ({name})"
    if unknown := set(entry) - _TOKEN_KEYS:
        raise TokensFileError(f"{where}: unknown key(s) {sorted(unknown)}; expected {sorted(_TOKEN_KEYS)}")
    digest = entry.get("sha256")
    try:
        raw = bytes.fromhex(digest) if isinstance(digest, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != hashlib.sha256().digest_size:
        raise TokensFileError(f"{where}: `sha256` must be the 64 hex digits of the token's SHA-256")
    scopes = _names(where, entry, "scopes", GRANTABLE_SCOPES, required=True)
    event_types = _names(where, entry, "event_types", _EVENT_TYPE_NAMES, required=False)
    return Token(name, raw, scopes or frozenset(), event_types)


def _names(
    where: str, entry: dict[str, Any], key: str, known: frozenset[str], *, required: bool
) -> frozenset[str] | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokensFileError(f"{where}: `{key}` must be a list of strings")
    for name in value:
        if name not in known:
            raise TokensFileError(
                f"{where}: unknown {key[:-1].replace('_', ' ')} {name!r} (known: {', '.join(sorted(known))})"
            )
    return frozenset(value)


# --- the interceptor ------------------------------------------------------------

Refusal = tuple[grpc.StatusCode, str]


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type hints
    """Checks every call's bearer token against the tokens file.

    `require()` gives each served method path the scope it needs (see
    interactions_client.access.required_scopes); OPEN_SERVICES need no
    token, ANY_TOKEN_SERVICES any valid one, and any other method `admin`.
    """

    def __init__(self, tokens_file: Path) -> None:
        self.tokens_file = tokens_file
        self._required: dict[str, str] = {}
        self._tokens = load_tokens(tokens_file)
        self._generation = 0  # reloads so far: a call rechecks its caller only after one

    def require(self, required: Mapping[str, str]) -> None:
        """The scope of each served method path (set before the server starts)."""
        self._required = dict(required)

    @property
    def token_names(self) -> list[str]:
        return [t.name for t in self._tokens]

    def reload(self) -> bool:
        """Re-reads the tokens file (SIGHUP). A file that does not load keeps
        the tokens in force and logs why; returns whether it loaded."""
        try:
            tokens = load_tokens(self.tokens_file)
        except TokensFileError as exc:
            _log.error("tokens file not reloaded, the previous tokens stay in force: %s", exc)
            return False
        self._tokens = tokens
        self._generation += 1
        _log.info("tokens file reloaded: %d token(s): %s", len(tokens), ", ".join(t.name for t in tokens))
        return True

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Token | None:
        """The token the metadata's bearer token matches, else None."""
        presented = next((v for k, v in metadata or () if k == AUTHORIZATION), None)
        if not isinstance(presented, str) or presented[: len(_BEARER)].lower() != _BEARER:
            return None
        digest = token_digest(presented[len(_BEARER) :].strip())
        found = None
        for token in self._tokens:  # every entry, no early exit: the time does not depend on which matched
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller | Refusal:
        """The caller of `method`, or why the call is refused."""
        token = self.authenticate(metadata)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token (authorization: Bearer <token>)"
        scope = self._required.get(method)
        if scope is None:
            scope = _unlisted_scope(method)
        if not token.holds(scope):
            _log.info("refused %s to token %s: needs scope %s", method, token.name, scope)
            return grpc.StatusCode.PERMISSION_DENIED, f"token {token.name!r} lacks the scope {scope!r} for {method}"
        return Caller(token.name, token.event_types, token.digest)

    def recheck(self, method: str, caller: Caller) -> Refusal | None:
        """Why an accepted call may no longer go on under the current tokens
        (its token removed or its scope taken away by a reload), else None."""
        token = None
        for candidate in self._tokens:  # as in authenticate: no early exit
            if hmac.compare_digest(caller.digest, candidate.digest):
                token = candidate
        if token is None:
            _log.info("token %s revoked: ending its open call of %s", caller.name, method)
            return grpc.StatusCode.UNAUTHENTICATED, "the bearer token was revoked"
        scope = self._required.get(method) or _unlisted_scope(method)
        if not token.holds(scope):
            _log.info("token %s lost the scope %s: ending its open call of %s", token.name, scope, method)
            return grpc.StatusCode.PERMISSION_DENIED, f"token {token.name!r} lacks the scope {scope!r} for {method}"
        return None

    def _revocation_check(self, method: str, caller: Caller) -> Callable[[], Refusal | None]:
        """For an accepted call: whether it may go on, rechecked only after a reload."""
        seen = self._generation
        refusal: Refusal | None = None

        def revoked() -> Refusal | None:
            nonlocal seen, refusal
            if refusal is None and seen != self._generation:
                seen = self._generation
                refusal = self.recheck(method, caller)
            return refusal

        return revoked

    async def intercept_service(
        self,
        continuation: handlers.Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or _service(method) in OPEN_SERVICES:
            return handler
        outcome = self.check(method, handler_call_details.invocation_metadata)
        revoked = self._revocation_check(method, outcome) if isinstance(outcome, Caller) else _never
        return _guarded(handler, outcome, revoked)


def _service(method: str) -> str:
    return method.lstrip("/").split("/", 1)[0]


def _unlisted_scope(method: str) -> str:
    return ANY_TOKEN if _service(method) in ANY_TOKEN_SERVICES else ADMIN


def _never() -> Refusal | None:
    return None


class _Revoked(grpc.aio.AbortError):  # type: ignore[misc]  # grpc has no type hints
    """Raised into the servicer from its request stream when the caller's token
    is revoked: an AbortError, so that the status interceptor lets it through
    (after the servicer answered what it had already accepted), and _guarded
    ends the call with the refusal."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal[1])
        self.refusal = refusal


def _guarded(
    handler: grpc.RpcMethodHandler, outcome: Caller | Refusal, revoked: Callable[[], Refusal | None]
) -> grpc.RpcMethodHandler:
    """`handler` behind the auth outcome, as a handler of the same streaming
    shape: a refused call ends before the servicer runs (for a client stream,
    before any request is read); an accepted one runs with its Caller set.
    A token revoked (or a scope taken away) by a reload also ends the calls
    it has open: a request stream before its next message reaches the
    servicer, a response stream before its next response."""
    behavior = handlers.behavior(handler)

    async def admit(context: grpc.aio.ServicerContext) -> None:
        if not isinstance(outcome, Caller):
            await context.abort(*outcome)  # raises
        else:
            _CALLER.set(outcome)
            metrics.current_client.set(outcome.name)  # the `client` label and log field: the token's name

    async def rechecked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if (refusal := revoked()) is not None:
                raise _Revoked(refusal)
            yield request

    def requests_of(request: Any) -> Any:
        return rechecked(request) if handler.request_streaming else request

    async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await admit(context)
        try:
            return await behavior(requests_of(request), context)
        except _Revoked as exc:
            await context.abort(*exc.refusal)

    async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await admit(context)
        responses = behavior(requests_of(request), context)
        try:
            if inspect.isawaitable(responses):  # a handler that writes with context.write()
                await responses
                return
            # aclosing: a cancelled call closes the handler's generator now (its
            # cleanup, e.g. an export's cursor, runs before the call ends).
            async with contextlib.aclosing(responses) as closing:
                async for response in closing:
                    # A request stream is checked per request: its answers to
                    # requests already accepted still go out.
                    if not handler.request_streaming and (refusal := revoked()) is not None:
                        await context.abort(*refusal)
                    yield response
        except _Revoked as exc:
            await context.abort(*exc.refusal)

    return handlers.rewrapped(handler, stream_response if handler.response_streaming else unary_response)


# --- helper commands --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["new"]:
        token = secrets.token_urlsafe(32)
        sys.stdout.write(f"token:  {token}\nsha256: {token_digest(token).hex()}\n")
        return 0
    if args == ["hash"]:
        # From stdin, so that the secret stays out of the shell history and `ps`.
        token = sys.stdin.readline().strip()
        if not token:
            sys.stderr.write("error: no token on stdin\n")
            return 2
        sys.stdout.write(token_digest(token).hex() + "\n")
        return 0
    sys.stderr.write("usage: python -m interactions_server.auth new | hash  (hash reads the token from stdin)\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
