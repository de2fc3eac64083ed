"""tests/test_multi_process.py on the cluster."""

from tests.test_multi_process import *  # noqa: F403 - every test of the module, on the cluster's fixtures
