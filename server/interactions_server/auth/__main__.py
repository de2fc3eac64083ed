"""`python -m interactions_server.auth new | hash` (the README's "Tokens")."""

import sys

from interactions_server.auth import main

sys.exit(main())
