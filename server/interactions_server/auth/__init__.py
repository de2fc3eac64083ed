"""Who may call what, apart from gRPC's plumbing: the tokens file, the scope
each RPC needs and the caller of the current call. rpc's TokenAuth applies
this policy to every call.

    python -m interactions_server.auth new    # a fresh random token and its sha256
    python -m interactions_server.auth hash   # the sha256 of a token read from stdin
"""

from interactions_server.auth._caller import (
    TYPE_NOT_ALLOWED,
    Caller,
    allowed_event_types,
    current_caller,
    event_type_violation,
    set_caller,
)
from interactions_server.auth._command import main
from interactions_server.auth._policy import (
    ANY_TOKEN_SERVICES,
    AUTHORIZATION,
    OPEN_SERVICES,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    Refusal,
    TokenPolicy,
    is_open,
)
from interactions_server.auth._tokens import Token, TokensFileError, load_tokens, token_digest

__all__ = [
    "ANY_TOKEN_SERVICES",
    "AUTHORIZATION",
    "OPEN_SERVICES",
    "PERMISSION_DENIED",
    "TYPE_NOT_ALLOWED",
    "UNAUTHENTICATED",
    "Caller",
    "Refusal",
    "Token",
    "TokenPolicy",
    "TokensFileError",
    "allowed_event_types",
    "current_caller",
    "event_type_violation",
    "is_open",
    "load_tokens",
    "main",
    "set_caller",
    "token_digest",
]
