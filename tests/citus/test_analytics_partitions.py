"""tests/test_analytics_partitions.py on the cluster."""

from tests.test_analytics_partitions import *  # noqa: F403 - every test of the module, on the cluster's fixtures
