"""tests/test_identity_order.py on the cluster: one person, one fold, whatever the order of links and events."""

from tests.test_identity_order import *  # noqa: F403 - every test of the module, on the cluster's fixtures
