"""tests/test_tokens_and_audit.py on the cluster."""

from tests.test_tokens_and_audit import *  # noqa: F403 - every test of the module, on the cluster's fixtures
