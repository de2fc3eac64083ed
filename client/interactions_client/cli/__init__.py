"""The `interactions` command (console script `interactions_client.cli:main`,
or `python -m interactions_client.cli`). The library never imports it.
`args` holds the argparse types it shares with `interactions-server`."""

from interactions_client.cli._errors import EXIT_FAILED, EXIT_OK, EXIT_REJECTED_LINES, EXIT_USAGE
from interactions_client.cli._main import build_parser, main

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_REJECTED_LINES", "EXIT_USAGE", "build_parser", "main"]
