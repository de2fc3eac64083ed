"""tests/test_retention.py on the cluster: the retention policy through the
coordinator (the checks of the policy's values and of a database that does
not exist need no cluster)."""

from tests.test_retention import *  # noqa: F403 - every test of the module, on the cluster's fixtures

del test_policy_values_are_checked, test_a_bad_policy_is_a_usage_error, test_an_unknown_database_fails_in_one_line  # noqa: F821
