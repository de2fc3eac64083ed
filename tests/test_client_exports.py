"""The client's public names stay where importers find them (like temporalio's
export test): what `from interactions_client import …` offers, the module
paths the READMEs and docs name, and the `interactions` console script. A
name that moves or goes breaks someone's import: change this list only with
a release note."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import interactions_client

PACKAGE_NAMES = [
    "RULES",
    "STANDARD",
    "BatchResult",
    "ConflictError",
    "DeadlineExceededError",
    "DeliveryFailedError",
    "Event",
    "EventIdReusedError",
    "EventStreamer",
    "EventType",
    "FailedPreconditionError",
    "FieldViolation",
    "Identity",
    "InteractionsClient",
    "InteractionsError",
    "InvalidArgumentError",
    "InvalidEventError",
    "LinkResult",
    "LogResult",
    "NotFoundError",
    "OverloadedError",
    "ParallelStreamer",
    "PermissionDeniedError",
    "Rejection",
    "StreamTotals",
    "SyncEventStreamer",
    "SyncInteractionsClient",
    "TlsConfig",
    "TypeRule",
    "UnauthenticatedError",
    "UnavailableError",
    "Undelivered",
    "Violation",
    "validate",
]

MODULE_NAMES = {
    "interactions_client.client": ["InteractionsClient"],
    "interactions_client.sync_client": ["SyncInteractionsClient"],
    "interactions_client.streamer": ["EventStreamer", "ParallelStreamer", "StreamTotals", "Undelivered"],
    "interactions_client.sync_streamer": ["SyncEventStreamer"],
    "interactions_client.analytics": ["AsyncExport", "SyncExport", "ResumePolicy", "event_type_number", "to_datetime"],
    "interactions_client.subscription": [
        "AsyncSubscription",
        "SyncSubscription",
        "SubscriptionBatch",
        "SUBSCRIPTION_POLICY",
    ],
    "interactions_client.errors": [
        "ConflictError",
        "DeadlineExceededError",
        "DeliveryFailedError",
        "EventIdReusedError",
        "FailedPreconditionError",
        "InteractionsError",
        "InvalidArgumentError",
        "InvalidEventError",
        "NotFoundError",
        "OverloadedError",
        "PermissionDeniedError",
        "UnauthenticatedError",
        "UnavailableError",
    ],
    "interactions_client.events": ["EventMethods", "new_event", "new_event_id", "timestamp", "with_event_id"],
    "interactions_client.validation": ["validate"],
    "interactions_client.results": ["BatchResult", "Identity", "LinkResult", "LogResult", "Rejection"],
    "interactions_client.channel": ["DEFAULT_DEADLINE", "KEEPALIVE_OPTIONS", "TlsConfig", "default_target"],
    "interactions_client.rules": ["CUSTOM", "RULES", "STANDARD", "TypeRule", "stored_name"],
    "interactions_client.limits": ["BOUNDS", "MAX_BATCH_EVENTS", "MAX_ID_LENGTH"],
    "interactions_client.rpc_protos": ["Violation", "bad_request_violations", "encode_bad_request_status"],
    "interactions_client.access": ["ADMIN", "ANY_TOKEN", "GRANTABLE_SCOPES", "MissingScopeError", "required_scopes"],
    "interactions_client.catalog": ["catalog_row", "format_table"],
    "interactions_client.v1.event_pb2": ["Event", "EventType", "FieldViolation"],
    "interactions_client.v1.interaction_service_pb2_grpc": ["InteractionServiceStub"],
    "interactions_client.v1.user_state_service_pb2_grpc": ["UserStateServiceStub"],
    "interactions_client.v1.analytics_service_pb2_grpc": ["AnalyticsServiceStub"],
    "interactions_client.v1.admin_service_pb2_grpc": ["AdminServiceStub"],
    "interactions_client.v1.event_stream_service_pb2_grpc": ["EventStreamServiceStub"],
    "interactions_client.cli": ["build_parser", "main"],
}


def test_the_package_exports_exactly_its_public_names() -> None:
    assert sorted(interactions_client.__all__) == sorted(PACKAGE_NAMES)
    for name in PACKAGE_NAMES:
        assert getattr(interactions_client, name) is not None, name


def test_the_documented_module_paths_hold_their_names() -> None:
    for module_name, names in MODULE_NAMES.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert hasattr(module, name), f"{module_name}.{name}"
            if name in PACKAGE_NAMES:  # one object, whichever way it is imported
                assert getattr(module, name) is getattr(interactions_client, name), f"{module_name}.{name}"


def test_the_console_script_resolves() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "client" / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"interactions": "interactions_client.cli:main"}
    module, _, function = project["project"]["scripts"]["interactions"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
