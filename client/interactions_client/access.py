"""Which scope each RPC needs, read from the schema's `required_scope` options.

protos/interactions/v1/access.proto declares the scopes (with their names in
a tokens file) and every RPC declares the scope it needs; the server checks
tokens against these, and `python -m interactions_client.access` prints the
table the README shows.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from interactions_client.v1 import (
    access_pb2,
    admin_service_pb2,
    analytics_service_pb2,
    event_stream_service_pb2,
    identity_service_pb2,
    interaction_service_pb2,
    recommendation_service_pb2,
    user_state_service_pb2,
)

ANY_TOKEN = ""
"""The scope name of SCOPE_ANY_TOKEN: any valid token may call the RPC."""
ADMIN = "admin"
"""A token with this scope holds every scope."""

# Scope enum number -> name in a tokens file ("" for SCOPE_ANY_TOKEN).
SCOPE_NAMES: Mapping[int, str] = MappingProxyType(
    {
        value.number: value.GetOptions().Extensions[access_pb2.scope_name]
        for value in access_pb2.Scope.DESCRIPTOR.values
        if value.GetOptions().HasExtension(access_pb2.scope_name)
    }
)
# The names a token may hold.
GRANTABLE_SCOPES: frozenset[str] = frozenset(SCOPE_NAMES.values()) - {ANY_TOKEN}

# Every service of the schema, in the order of the README's table.
SCHEMA_SERVICES: tuple[ServiceDescriptor, ...] = (
    interaction_service_pb2.DESCRIPTOR.services_by_name["InteractionService"],
    user_state_service_pb2.DESCRIPTOR.services_by_name["UserStateService"],
    analytics_service_pb2.DESCRIPTOR.services_by_name["AnalyticsService"],
    recommendation_service_pb2.DESCRIPTOR.services_by_name["RecommendationService"],
    identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"],
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
    event_stream_service_pb2.DESCRIPTOR.services_by_name["EventStreamService"],
)


class MissingScopeError(Exception):
    """An RPC declares no (or an unknown) required_scope."""


def method_path(service: ServiceDescriptor, method: MethodDescriptor) -> str:
    """The gRPC path of a method, e.g. "/interactions.v1.AdminService/DeleteUserData"."""
    return f"/{service.full_name}/{method.name}"


def required_scope(method: MethodDescriptor) -> str:
    """The scope name `method` needs ("" for any valid token)."""
    options = method.GetOptions()
    number = options.Extensions[access_pb2.required_scope] if options.HasExtension(access_pb2.required_scope) else 0
    if number not in SCOPE_NAMES:
        raise MissingScopeError(f"{method.full_name} declares no (interactions.v1.required_scope) option")
    return SCOPE_NAMES[number]


def required_scopes(services: Iterable[ServiceDescriptor]) -> dict[str, str]:
    """Method path -> scope name for every RPC of `services`; raises
    MissingScopeError when one of them declares none."""
    return {method_path(service, method): required_scope(method) for service in services for method in service.methods}


def scope_table(services: Iterable[ServiceDescriptor] = SCHEMA_SERVICES) -> str:
    """The Markdown table of the README's "Deploying securely" section."""
    lines = ["| service | RPC | scope |", "|---|---|---|"]
    for service in services:
        for method in service.methods:
            scope = required_scope(method)
            lines.append(f"| `{service.name}` | `{method.name}` | {f'`{scope}`' if scope else 'any valid token'} |")
    return "\n".join(lines)


def main() -> int:
    sys.stdout.write(scope_table() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
