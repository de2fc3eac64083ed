"""The README's scopes table is the one generated from the schema."""

from __future__ import annotations

import re
from pathlib import Path

from interactions_client.access import SCHEMA_SERVICES, required_scopes, scope_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_scopes_table_is_generated_from_the_schema() -> None:
    shown = re.search(r"<!-- scopes:begin -->\n(.*?)\n<!-- scopes:end -->", README.read_text(), re.S)
    assert shown is not None, "README.md lacks the scopes table markers"
    assert shown[1] == scope_table(), "regenerate with: python -m interactions_client.access"


def test_every_rpc_of_the_schema_declares_its_scope() -> None:
    required = required_scopes(SCHEMA_SERVICES)
    assert required["/interactions.v1.AdminService/DeleteUserData"] == "admin"
    assert required["/interactions.v1.InteractionService/ListEventTypes"] == ""
    assert required["/interactions.v1.UserStateService/GetCart"] == "state:read"
    assert len(required) == sum(len(s.methods) for s in SCHEMA_SERVICES)
