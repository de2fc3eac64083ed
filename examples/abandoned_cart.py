"""Email (print) users whose cart has had no activity for N minutes.

    python examples/abandoned_cart.py --target localhost:50051 --idle-minutes 30 --state carts.json

A consumer of the event stream (docs/subscribe.md): it subscribes to the
cart events and purchases, keeps each user's last cart activity, and when a
user has been idle for `--idle-minutes` with something still in the cart
(checked with GetCart when the time comes) it "emails" them, once per
abandonment: a line on stdout. A purchase after the cart activity means the
cart was not abandoned; a UserDeleted record forgets the user.

What it knows is in the `--state` file, written after every batch together
with the stream's cursor, so a restart goes on where it stopped: no user is
emailed twice for the same abandonment and none is missed. (A crash between
the email and the write of the state can email a user once more: the stream
is at least once, and so is this.)

Needs a token with the scopes `events:subscribe` and `state:read` when the
server checks tokens (`--token` or INTERACTIONS_TOKEN).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from interactions_client import FailedPreconditionError, InteractionsClient
from interactions_client.rules import stored_name
from interactions_client.subscription import SubscriptionBatch

CART_TYPES = ["add_to_cart", "remove_from_cart", "update_cart_quantity", "cart_add", "cart_remove", "cart_update"]
WATCHED = [*CART_TYPES, "purchase"]


@dataclass
class State:
    """What the consumer knows: the stream's cursor, each watched user's last
    cart activity (epoch seconds of occurred_at), and the users already
    emailed about their current cart."""

    cursor: str = ""
    last_activity: dict[str, float] = field(default_factory=dict)
    emailed: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(data["cursor"], data["last_activity"], set(data["emailed"]))

    def save(self, path: Path) -> None:
        """Atomically: a crash leaves the old file or the new one."""
        partial = path.with_name(path.name + ".partial")
        data = {"cursor": self.cursor, "last_activity": self.last_activity, "emailed": sorted(self.emailed)}
        partial.write_text(json.dumps(data))
        os.replace(partial, path)

    def apply(self, batch: SubscriptionBatch) -> None:
        for exported in batch.events:
            event = exported.event
            at = event.occurred_at.seconds + event.occurred_at.nanos / 1e9
            user = event.user_id
            if stored_name(event) == "purchase":
                if at >= self.last_activity.get(user, float("inf")):
                    self.forget(user)  # checked out after the last cart change
            elif at >= self.last_activity.get(user, float("-inf")):
                self.last_activity[user] = at
                self.emailed.discard(user)  # a new cart: a new abandonment may follow
        for deletion in batch.deletions:
            self.forget(deletion.user_id)
        self.cursor = batch.cursor

    def forget(self, user: str) -> None:
        self.last_activity.pop(user, None)
        self.emailed.discard(user)

    def idle(self, idle_seconds: float, now: float) -> list[str]:
        return sorted(u for u, at in self.last_activity.items() if now - at >= idle_seconds and u not in self.emailed)


async def email_idle(client: InteractionsClient, state: State, idle_seconds: float) -> None:
    for user in state.idle(idle_seconds, time.time()):
        cart = await client.get_cart(user)
        if cart:
            items = ", ".join(f"{item.quantity} x {item.product_id}" for item in cart)
            print(f"email {user}: you left {items} in your cart", flush=True)
            state.emailed.add(user)
        else:
            state.forget(user)  # emptied in the meantime


async def run(args: argparse.Namespace) -> int:
    state = State.load(args.state)
    deadline = None if args.exit_after is None else time.monotonic() + args.exit_after
    async with InteractionsClient(args.target, token=args.token) as client:
        subscription = client.subscribe(
            event_types=WATCHED, cursor=state.cursor, start="earliest" if args.from_start else "now"
        )
        batches = aiter(subscription)
        pending: asyncio.Task[SubscriptionBatch] | None = None
        try:
            while deadline is None or time.monotonic() < deadline:
                if pending is None:
                    pending = asyncio.ensure_future(anext(batches))
                wait = args.check_every if deadline is None else min(args.check_every, deadline - time.monotonic())
                done, _ = await asyncio.wait([pending], timeout=max(wait, 0))
                if done:
                    state.apply(pending.result())
                    pending = None
                await email_idle(client, state, args.idle_minutes * 60)
                state.save(args.state)
        except FailedPreconditionError as error:
            print(f"the stored cursor is too old ({error.message}); start again with --from-start", file=sys.stderr)
            return 1
        finally:
            if pending is not None:
                pending.cancel()
            subscription.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("INTERACTIONS_TARGET", "localhost:50051"))
    parser.add_argument("--token", default=os.environ.get("INTERACTIONS_TOKEN"))
    parser.add_argument("--idle-minutes", type=float, default=30.0, help="idle this long: email (default 30)")
    parser.add_argument("--state", type=Path, default=Path("abandoned-carts.json"), help="cursor and users, kept here")
    parser.add_argument("--from-start", action="store_true", help="without a state file: from the oldest event")
    parser.add_argument("--check-every", type=float, default=5.0, help="seconds between checks (default 5)")
    parser.add_argument("--exit-after", type=float, help="stop after this many seconds (default: run until killed)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
