"""tests/test_export_deletion.py on the cluster."""

from tests.test_export_deletion import *  # noqa: F403 - every test of the module, on the cluster's fixtures
