"""`python -m interactions_server.auth new | hash`: tokens and their hashes for the tokens file."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Sequence

from interactions_server.auth._tokens import token_digest


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
