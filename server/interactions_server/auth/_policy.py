"""Bearer tokens with scopes: who may call which RPC.

Each call's `authorization: Bearer <token>` is hashed and compared, in
constant time, with every entry of the tokens file (_tokens.py); the scope
each RPC needs comes from the schema (interactions_client.access). The
interceptor that applies this to every call is rpc's TokenAuth: a refused
call never reaches the servicer.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from interactions_client.access import ADMIN, ANY_TOKEN
from interactions_server.auth._caller import Caller
from interactions_server.auth._tokens import Token, TokensFileError, load_tokens, token_digest

_log = logging.getLogger("interactions_server.auth")

AUTHORIZATION = "authorization"
_BEARER = "bearer "
# Probes carry no token: health stays open whatever the tokens file says.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
# Reflection needs any valid token. Any other method the scopes do not list
# (a service registered without its scopes: a bug) needs `admin`: fail closed.
ANY_TOKEN_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})

UNAUTHENTICATED, PERMISSION_DENIED = "UNAUTHENTICATED", "PERMISSION_DENIED"  # names of gRPC status codes


class Refusal(NamedTuple):
    """Why a call is refused: `code` names its gRPC status (rpc's TokenAuth ends the call with it)."""

    code: str  # UNAUTHENTICATED: no valid token; PERMISSION_DENIED: a token without the scope
    message: str


class TokenPolicy:
    """Checks a call's bearer token against the tokens file.

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
        """The token the metadata's bearer token matches, else None (also when
        the call carries more than one `authorization` header: which one a
        proxy or another reader of the call would take is anyone's guess)."""
        presented = [v for k, v in metadata or () if k.lower() == AUTHORIZATION]
        if len(presented) != 1:
            return None
        (bearer,) = presented
        if not isinstance(bearer, str) or bearer[: len(_BEARER)].lower() != _BEARER:
            return None
        digest = token_digest(bearer[len(_BEARER) :].strip())
        found = None
        for token in self._tokens:  # every entry, no early exit: the time does not depend on which matched
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found

    def authorize(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller | Refusal:
        """The caller of `method`, or why the call is refused."""
        metadata = tuple(metadata or ())
        if sum(k.lower() == AUTHORIZATION for k, _ in metadata) > 1:
            return Refusal(UNAUTHENTICATED, "more than one authorization header; send exactly one bearer token")
        token = self.authenticate(metadata)
        if token is None:
            return Refusal(UNAUTHENTICATED, "missing or unknown bearer token (authorization: Bearer <token>)")
        scope = self._required.get(method)
        if scope is None:
            scope = _unlisted_scope(method)
        if not token.holds(scope):
            _log.info("refused %s to token %s: needs scope %s", method, token.name, scope)
            return Refusal(PERMISSION_DENIED, f"token {token.name!r} lacks the scope {scope!r} for {method}")
        return Caller(token.name, token.event_types, token.digest)

    def reauthorize(self, method: str, caller: Caller) -> Refusal | None:
        """Why an accepted call may no longer go on under the current tokens
        (its token removed or its scope taken away by a reload), else None."""
        token = None
        for candidate in self._tokens:  # as in authenticate: no early exit
            if hmac.compare_digest(caller.digest, candidate.digest):
                token = candidate
        if token is None:
            _log.info("token %s revoked: ending its open call of %s", caller.name, method)
            return Refusal(UNAUTHENTICATED, "the bearer token was revoked")
        scope = self._required.get(method) or _unlisted_scope(method)
        if not token.holds(scope):
            _log.info("token %s lost the scope %s: ending its open call of %s", token.name, scope, method)
            return Refusal(PERMISSION_DENIED, f"token {token.name!r} lacks the scope {scope!r} for {method}")
        return None

    def revocation_check(self, method: str, caller: Caller) -> Callable[[], Refusal | None]:
        """For an accepted call: whether it may go on, rechecked only after a reload."""
        seen = self._generation
        refusal: Refusal | None = None

        def revoked() -> Refusal | None:
            nonlocal seen, refusal
            if refusal is None and seen != self._generation:
                seen = self._generation
                refusal = self.reauthorize(method, caller)
            return refusal

        return revoked


def is_open(method: str) -> bool:
    """Whether `method` (a path, /package.Service/Method) needs no token."""
    return _service(method) in OPEN_SERVICES


def _service(method: str) -> str:
    return method.lstrip("/").split("/", 1)[0]


def _unlisted_scope(method: str) -> str:
    return ANY_TOKEN if _service(method) in ANY_TOKEN_SERVICES else ADMIN
