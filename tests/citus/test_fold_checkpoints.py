"""tests/test_fold_checkpoints.py on the cluster: the fold's history and
segments, late events, retention, fold_events (the migration's own test and
the pure algebra run on PostgreSQL only)."""

from tests.test_fold_checkpoints import (  # noqa: F401 - the tests and their fixtures, on the cluster's fixtures
    reads,
    segment_events,
    test_a_late_event_reads_its_segment_and_the_keys_segment_functions,
    test_fold_events_folds_events_into_keys_out_of_the_write_path,
    test_in_order_events_seal_a_segment_every_n_events,
    test_late_events_over_a_long_key_equal_the_fold,
    test_retention_then_a_late_event_keeps_the_first_added_at,
    test_retention_then_a_late_event_keeps_what_retention_removed,
    test_the_resend_of_an_event_older_than_retention_is_not_folded_twice,
)
