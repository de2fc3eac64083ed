"""The write path, without gRPC: a batch of events in, one transaction,
per-event outcomes out. The Ingestor validates and writes a batch (the log
insert and, in the same transaction, the state sync of _sync.py, whose fold
algebra is _fold.py's); the GroupCommitter makes concurrent single-event
calls share transactions; the stored JSON of details and attributes is
_event_json.py's. `fold_events` folds accepted events into the state outside
the write path (SyncEvent: what it needs of each); identity links
(LinkIdentity's IdentityLinker, and the Ingestor's logins that link) are
_identity.py's."""

from interactions_server.ingest._event_json import attributes_json, details_json
from interactions_server.ingest._group_commit import GroupCommitter, Outcome
from interactions_server.ingest._identity import IdentityLinker, LinkResult
from interactions_server.ingest._ingestor import CONFLICT_DESCRIPTION, BatchResult, Ingestor, Rejection, fingerprint
from interactions_server.ingest._sync import SyncEvent, fold_events

__all__ = [
    "CONFLICT_DESCRIPTION",
    "BatchResult",
    "GroupCommitter",
    "IdentityLinker",
    "Ingestor",
    "LinkResult",
    "Outcome",
    "Rejection",
    "SyncEvent",
    "attributes_json",
    "details_json",
    "fingerprint",
    "fold_events",
]
