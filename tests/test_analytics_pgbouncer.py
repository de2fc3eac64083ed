"""AnalyticsService behind pgbouncer in transaction mode: no session settings
(pgbouncer refuses work_mem as a startup parameter), work_mem per transaction."""

from __future__ import annotations

import grpc
import pytest

from interactions_client.v1 import analytics_service_pb2 as pb
from interactions_client.v1 import analytics_service_pb2_grpc
from interactions_client.v1 import interaction_service_pb2 as isv
from interactions_client.v1.event_pb2 import EventType
from interactions_client.v1.interaction_service_pb2_grpc import InteractionServiceStub
from tests.events import valid_event
from tests.support import StartServer
from tests.test_pgbouncer import PGBOUNCER, pgbouncer


@pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed (apt-get install pgbouncer)")
async def test_analytics_work_behind_pgbouncer(database_url: str, start_server: StartServer) -> None:
    async with pgbouncer(database_url) as bouncer_url:
        app = await start_server(database_url=bouncer_url, statement_cache_size=0)
        try:
            async with grpc.aio.insecure_channel(app.address) as channel:
                event = valid_event(EventType.EVENT_TYPE_VIEW, user_id="pgb", product_id="p1")
                await InteractionServiceStub(channel).LogEvent(isv.LogEventRequest(event=event))
                stub = analytics_service_pb2_grpc.AnalyticsServiceStub(channel)
                for _ in range(2):  # a second time on the same pooled connections
                    assert (await stub.CountActiveUsers(pb.CountActiveUsersRequest())).active_users == 1
                    assert (await stub.TopSearchQueries(pb.TopSearchQueriesRequest())).queries == []
                    exported = [
                        e.event.user_id async for r in stub.ExportEvents(pb.ExportEventsRequest()) for e in r.events
                    ]
                    assert exported == ["pgb"]
                    training = [r async for r in stub.ExportTrainingData(pb.ExportTrainingDataRequest())]
                    assert [(r.user_id, r.product_id) for r in training[0].rows] == [("pgb", "p1")]
                    activity = await stub.GetUserActivity(pb.GetUserActivityRequest(user_id="pgb"))
                    assert dict(activity.event_counts) == {"view": 1}
        finally:
            await app.stop()
