"""tests/test_order_independence.py on the cluster."""

from tests.test_order_independence import *  # noqa: F403 - every test of the module, on the cluster's fixtures
