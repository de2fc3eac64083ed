"""tests/test_client_server.py on the cluster."""

from tests.test_client_server import *  # noqa: F403 - every test of the module, on the cluster's fixtures
