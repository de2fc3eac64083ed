"""tests/test_identity.py on the cluster: links, moves, chains, logins that link, deletion by person."""

from tests.test_identity import *  # noqa: F403 - every test of the module, on the cluster's fixtures
