"""Prints the rule catalog: `python -m interactions_client.catalog`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from interactions_client.rules import RULES, ProductIdRule, SyncTarget, TypeRule, ValueRule

VALUE_LABELS = {
    ValueRule.VALUE_RULE_ALWAYS_ONE: "1",
    ValueRule.VALUE_RULE_QUANTITY: "quantity",
    ValueRule.VALUE_RULE_QUANTITY_OR_ALL: "quantity",
    ValueRule.VALUE_RULE_NEW_QUANTITY: "new_quantity",
    ValueRule.VALUE_RULE_ADD_OR_REMOVE: "1 or 0",
    ValueRule.VALUE_RULE_RATING: "1-5",
    ValueRule.VALUE_RULE_ANY: "any",
}
PRODUCT_LABELS = {
    ProductIdRule.PRODUCT_ID_RULE_REQUIRED: "Required",
    ProductIdRule.PRODUCT_ID_RULE_OPTIONAL: "Optional",
    ProductIdRule.PRODUCT_ID_RULE_NOT_ALLOWED: "No",
}
SYNC_LABELS = {
    SyncTarget.SYNC_TARGET_NONE: "No",
    SyncTarget.SYNC_TARGET_USER_CART: "user_cart",
    SyncTarget.SYNC_TARGET_PURCHASE_HISTORY: "purchase_history",
    SyncTarget.SYNC_TARGET_USER_WISHLIST: "user_wishlist",
}
HEADER = ("#", "Event Type", "event_value", "Product ID", "Syncs to State Table", "ML Weight")


def catalog_row(rule: TypeRule) -> tuple[str, ...]:
    """One row in the layout of the seed's summary table."""
    weight = "-" if rule.ml_weight is None else f"{rule.ml_weight:.1f}x"
    return (
        str(rule.event_type),
        rule.name,
        VALUE_LABELS[rule.value],
        PRODUCT_LABELS[rule.product_id],
        SYNC_LABELS[rule.sync],
        weight,
    )


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    sys.stdout.write(format_table(HEADER, [catalog_row(r) for r in RULES.values()]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
