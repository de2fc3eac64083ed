"""The tokens file (TOML, `--auth-tokens`): one `[[token]]` table per client,
its `name` (shown in logs, never the secret), the hex `sha256` of the secret,
its `scopes` and optionally the `event_types` it may log."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interactions_client.access import ADMIN, ANY_TOKEN, GRANTABLE_SCOPES
from interactions_client.rules import RULES

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


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


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
