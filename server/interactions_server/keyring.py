"""The server's secrets in use: sealed tokens and keyed hashes of ids.

Every token the server hands out for a caller to give back (the resume tokens
of the exports, the page tokens of ListPurchases, ListSessions and
ListUserEvents, later the subscription cursors) goes through one Keyring:

    token = keyring.seal("events", occurred_us, event_id)        # opaque text
    occurred_us, event_id = keyring.open(token, "events", "resume_token")

`seal` encrypts and authenticates the parts (a JSON array) with AES-SIV
(RFC 5297, a 512-bit key), binding `kind` as associated data: a token cannot
be read (it carries no id in clear), edited (any change fails to open) or
used by another kind of call. `open` raises InvalidArgument naming `field`
for anything that is not a token of that kind sealed by this deployment.
AES-SIV is deterministic and takes no nonce: the same position always seals
to the same token (which tells a caller nothing the rows did not), and no
nonce has to stay unique across every worker and host sharing the key.

`subject_hash(user_id)` is the keyed hash (HMAC-SHA256) under which the
audit log (storage.record_audit) names a user, so that it holds no raw id
and the hash of a guessed id cannot be computed without the key.

The keys are rows of `server_keys` (migrations/0007_keys_and_audit.sql),
created by the first server that starts on a database and read by every
other (storage.load_keyring), so a token sealed by one worker or host opens
on every other. Each key has a version; a token starts with the version of
the key that sealed it, so a new key (a row with the next version) seals
new tokens while the old one still opens those already handed out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from interactions_client.v1.event_pb2 import FieldViolation
from interactions_server.errors import InvalidArgument

__all__ = [
    "AUDIT",
    "CURSOR",
    "INVALID_TOKEN",
    "KEY_BYTES",
    "MAX_TOKEN_LENGTH",
    "Keyring",
    "SubjectHash",
    "invalid_token",
    "new_secret",
]

CURSOR = "cursor"  # purpose of the keys that seal tokens (AES-SIV, 64 bytes)
AUDIT = "audit"  # purpose of the keys of subject hashes (HMAC-SHA256, 32 bytes)
KEY_BYTES = {CURSOR: 64, AUDIT: 32}
MAX_TOKEN_LENGTH = 4_096  # characters; a genuine token stays far below (two ids at their bound: about 1.5k)
INVALID_TOKEN = "is not a token from a previous response of this RPC"


def new_secret(purpose: str) -> bytes:
    """A fresh random key for `purpose`."""
    return secrets.token_bytes(KEY_BYTES[purpose])


def invalid_token(field: str) -> InvalidArgument:
    violation = FieldViolation(field=field, description=INVALID_TOKEN)
    return InvalidArgument([violation], f"invalid {field.replace('_', ' ')}")


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


class SubjectHash(NamedTuple):
    """A user id as the audit log stores it: HMAC-SHA256 under audit key `version`."""

    version: int
    digest: bytes  # 32 bytes


class Keyring:
    """The keys of one deployment: `keys[purpose][version]` = secret.
    Seals with the newest cursor key, opens with any; hashes with the newest audit key."""

    def __init__(self, keys: Mapping[str, Mapping[int, bytes]]) -> None:
        for purpose in (CURSOR, AUDIT):
            versions = keys.get(purpose)
            if not versions:
                raise ValueError(f"no {purpose} key")
            for version, secret in versions.items():
                if not 1 <= version <= 255 or len(secret) != KEY_BYTES[purpose]:
                    raise ValueError(f"{purpose} key {version} is not a {KEY_BYTES[purpose]}-byte key of version 1-255")
        self._sealers = {version: AESSIV(secret) for version, secret in keys[CURSOR].items()}
        self._seal_version = max(self._sealers)
        self._audit_version = max(keys[AUDIT])
        self._audit_key = keys[AUDIT][self._audit_version]

    @classmethod
    def generate(cls) -> Keyring:
        """A keyring of fresh keys, for code that runs without a database (tools, tests)."""
        return cls({purpose: {1: new_secret(purpose)} for purpose in (CURSOR, AUDIT)})

    def seal(self, kind: str, *parts: Any) -> str:
        """An opaque token holding `parts` (JSON values), openable only as `kind`."""
        plain = json.dumps(parts, separators=(",", ":"), ensure_ascii=False).encode()
        version = self._seal_version
        sealed = self._sealers[version].encrypt(plain, [kind.encode(), bytes([version])])
        return _text(bytes([version]) + sealed)

    def open(self, token: str, kind: str, field: str, count: int | None = None) -> list[Any]:
        """The parts `token` was sealed with as `kind`; InvalidArgument naming
        `field` when it is anything else (garbled, edited, another kind, another
        deployment's, or not `count` parts when `count` is given)."""
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise invalid_token(field)
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
            if _text(raw) != token:  # one spelling per token: no unused bits or padding to vary
                raise invalid_token(field)
            sealer = self._sealers.get(raw[0]) if raw else None
            if sealer is None:
                raise invalid_token(field)
            parts = json.loads(sealer.decrypt(raw[1:], [kind.encode(), raw[:1]]))
        except (InvalidTag, ValueError, binascii.Error) as exc:  # JSON and UTF-8 errors are ValueErrors
            raise invalid_token(field) from exc
        if not isinstance(parts, list) or (count is not None and len(parts) != count):
            raise invalid_token(field)
        return parts

    def subject_hash(self, user_id: str) -> SubjectHash:
        """How the audit log names `user_id` (never the id itself)."""
        digest = hmac.new(self._audit_key, user_id.encode(), hashlib.sha256).digest()
        return SubjectHash(self._audit_version, digest)
