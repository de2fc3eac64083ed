"""`python -m interactions_client.cli`: the `interactions` command."""

import sys

from interactions_client.cli import main

sys.exit(main())
