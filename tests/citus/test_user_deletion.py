"""tests/test_user_deletion.py on the cluster."""

from tests.test_user_deletion import *  # noqa: F403 - every test of the module, on the cluster's fixtures
