"""tests/test_interaction_service.py on the cluster."""

from tests.test_interaction_service import *  # noqa: F403 - every test of the module, on the cluster's fixtures
