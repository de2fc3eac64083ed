"""tests/test_export_user_data.py on the cluster."""

from tests.test_export_user_data import *  # noqa: F403 - every test of the module, on the cluster's fixtures
