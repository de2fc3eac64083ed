"""The algebra of the state fold: each fold step is a function of one closed
family per state table, stored as a pair (a, b), so that any run of steps
composes into a single pair. That is what lets a key's history be cut into
sealed segments of which only the function is kept (migrations/0006).

- cart_lines, quantity q: q -> b if a is None, else max(q + a, b).
  add v: (v, 0); remove v: (-v, 0); remove all: (None, 0); set v: (None, v).
- wishlist_lines, added_at s (epoch us, None: not on it): s -> b if a is None,
  else (s if s is not None else b). add at t: (0, t); remove: (None, None).

Composition, f then g: a = a_f + a_g where None absorbs (a constant forgets
what came before it), and b as the family needs (cart: max(b_f + a_g, b_g),
None ignored by max; wishlist: b_g if g is constant, else b_f if set, else
b_g). Both are associative, with the identities (0, 0) and (0, None);
tests/test_fold_checkpoints.py checks composition against the step-by-step
fold. The migration 0006 mirrors this in SQL, once, to seal existing data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

Fn = tuple[int | None, int | None]  # (a, b)


def _plus(x: int | None, y: int | None) -> int | None:
    return None if x is None or y is None else x + y


def _max(x: int | None, y: int | None) -> int | None:
    """max() ignoring None, like SQL's greatest()."""
    if x is None:
        return y
    return x if y is None else max(x, y)


def _cart_then(f: Fn, g: Fn) -> Fn:
    return _plus(f[0], g[0]), _max(_plus(f[1], g[0]), g[1])


def _cart_apply(f: Fn, q: int | None) -> int | None:
    a, b = f
    return b if a is None else _max((q or 0) + a, b)


def _wishlist_then(f: Fn, g: Fn) -> Fn:
    if g[0] is None:
        return g
    return _plus(f[0], g[0]), f[1] if f[1] is not None else g[1]


def _wishlist_apply(f: Fn, s: int | None) -> int | None:
    a, b = f
    return b if a is None else (s if s is not None else b)


def _cart_compose(fns: Iterable[Fn], f: Fn) -> Fn:
    """_cart_then over a run, inlined: a late event composes a whole segment."""
    a, b = f
    for a2, b2 in fns:
        if a2 is None:
            a, b = None, b2
            continue
        if a is not None:
            a += a2
        if b is None:
            b = b2
        elif b2 is None:
            b += a2
        else:
            b = max(b + a2, b2)
    return a, b


def _wishlist_compose(fns: Iterable[Fn], f: Fn) -> Fn:
    a, b = f
    for a2, b2 in fns:
        if a2 is None:
            a, b = None, b2
        elif b is None:
            b = b2
    return a, b


@dataclass(frozen=True, slots=True)
class Family:
    """A state table's function family: the identity, f-then-g, f(state), and
    the composition of a run (the same as `then` step by step, faster)."""

    identity: Fn
    then: Callable[[Fn, Fn], Fn]
    apply: Callable[[Fn, int | None], int | None]
    run: Callable[[Iterable[Fn], Fn], Fn]

    def compose(self, fns: Iterable[Fn], start: Fn | None = None) -> Fn:
        """`start` (the identity when None) then each of `fns`, in order."""
        return self.run(fns, self.identity if start is None else start)


CART = Family((0, 0), _cart_then, _cart_apply, _cart_compose)
WISHLIST = Family((0, None), _wishlist_then, _wishlist_apply, _wishlist_compose)


# A step's function from the event's (event_value, occurred_at in epoch us).
Step = Callable[[int, int], Fn]


def add_quantity(v: int, _: int) -> Fn:
    return (v, 0)


def remove_quantity(v: int, _: int) -> Fn:
    return (None, 0) if v == 0 else (-v, 0)


def set_quantity(v: int, _: int) -> Fn:
    return (None, v)


def add_or_remove(v: int, occurred_us: int) -> Fn:
    return (None, None) if v == 0 else (0, occurred_us)
