"""One module per gRPC service of the schema, each a servicer that maps
requests to the write path (ingest), the statements (storage) and back to
responses; their private helpers beside them. Servicers raise the exceptions
of interactions_server.errors, never set a status themselves, and hold no SQL."""

from interactions_server.services._event_stream_protos import encode_event as encode_stream_event
from interactions_server.services.admin import AdminService
from interactions_server.services.analytics import AnalyticsService
from interactions_server.services.event_stream import EventStreamService
from interactions_server.services.identity import IdentityService
from interactions_server.services.interactions import InteractionService
from interactions_server.services.recommendations import RecommendationService
from interactions_server.services.user_state import UserStateService

__all__ = [
    "AdminService",
    "AnalyticsService",
    "EventStreamService",
    "IdentityService",
    "InteractionService",
    "RecommendationService",
    "UserStateService",
    "encode_stream_event",
]
