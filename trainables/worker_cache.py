"""What a process keeps between the runs it trains, so that a Ray worker running trial after trial
(Tune's reused actors) loads the tokenizer, tokenizes the splits and quantizes the base once.

Each store keeps its few most recent entries, keyed by everything that shapes them; callers hand
out copies where a run could change what they got (the base), and share the rest read-only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")

SIZES = {"tokenizer": 2, "encoded": 8, "base": 2, "model": 1}
"""Entries kept per store: a study alternates between two approaches, each with train and eval splits.
One model with adapters (the last run's, trained weights and all): a process then holds what it held
when each run copied the base, the pristine base and one working model."""

_STORES: dict[str, OrderedDict] = {}


def cached(store: str, key: Hashable, make: Callable[[], T]) -> T:
    """The entry ``key`` of ``store``, made by ``make()`` on a miss (after dropping the oldest
    entries, so a large one is freed before the next is built)."""
    entries = _STORES.setdefault(store, OrderedDict())
    if key in entries:
        entries.move_to_end(key)
        return entries[key]
    while len(entries) >= SIZES[store]:
        entries.popitem(last=False)
    entries[key] = value = make()
    return value


def entries(store: str) -> int:
    return len(_STORES.get(store, ()))


def clear(*stores: str) -> None:
    """Forget the given stores (all when none is named)."""
    for store in stores or list(_STORES):
        _STORES.pop(store, None)


def digest(*parts: Any) -> str:
    """A content key for lists of texts and labels."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        for item in part:
            h.update(str(item).encode())
            h.update(b"\x1f")
        h.update(b"\x1e")
    return h.hexdigest()
