"""tests/test_write_path.py on the cluster: every sync rule, duplicates and
conflicts, partitions and retention, group commit, the state-sync locks."""

from tests.test_write_path import *  # noqa: F403 - every test of the module, on the cluster's fixtures
