"""tests/test_purge.py on the cluster."""

from tests.test_purge import *  # noqa: F403 - every test of the module, on the cluster's fixtures
