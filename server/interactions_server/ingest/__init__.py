"""The write path, without gRPC: a batch of events in, one transaction,
per-event outcomes out. The Ingestor validates and writes a batch (the log
insert and, in the same transaction, the state sync of _sync.py); the
GroupCommitter makes concurrent single-event calls share transactions; the
stored JSON of details and attributes is _event_json.py's."""

from interactions_server.ingest._event_json import attributes_json, details_json
from interactions_server.ingest._group_commit import GroupCommitter, Outcome
from interactions_server.ingest._ingestor import CONFLICT_DESCRIPTION, BatchResult, Ingestor, Rejection, fingerprint

__all__ = [
    "CONFLICT_DESCRIPTION",
    "BatchResult",
    "GroupCommitter",
    "Ingestor",
    "Outcome",
    "Rejection",
    "attributes_json",
    "details_json",
    "fingerprint",
]
