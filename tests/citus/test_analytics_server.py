"""tests/test_analytics_server.py on the cluster."""

from tests.test_analytics_server import *  # noqa: F403 - every test of the module, on the cluster's fixtures
