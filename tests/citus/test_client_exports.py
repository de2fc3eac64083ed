"""tests/test_client_exports.py on the cluster."""

from tests.test_client_exports import *  # noqa: F403 - every test of the module, on the cluster's fixtures
