"""Allocator core: label sets -> ids, with reference counts, over a Backend.

An identity is held by references (endpoints, CIDR rules). `allocate`
takes a reference and returns the existing id of the label set or the
lowest free id; `release` drops one, and the id is freed for reuse when the
last reference goes. Everything that must survive a restart goes through
the backend, so reopening the same store gives the same ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from flagella.errors import FlagellaError
from flagella.policy.identities import (
    MIN_ALLOCATED_ID,
    RESERVED_IDENTITIES,
    reserved_identity_labels,
)
from flagella.policy.labels import Label, LabelSet, parse_label

MAX_IDENTITY = 0xFFFFFF


class IdentityExhausted(FlagellaError):
    pass


def labels_key(labels: Iterable[Label]) -> str:
    """The canonical, sorted text form of a label set (the store's key)."""
    return ";".join(str(lab) for lab in sorted(labels))


def key_labels(key: str) -> LabelSet:
    return frozenset(parse_label(part, "unspec") for part in key.split(";") if part)


class Backend(Protocol):
    """Where identities live. Implementations must be atomic per call."""

    def lookup(self, key: str) -> int | None: ...
    def get(self, ident: int) -> str | None: ...
    def acquire(self, key: str, lowest_free_from: int) -> int:
        """Return the id of ``key`` (creating it at the lowest free id) and add a reference."""
        ...
    def release(self, ident: int) -> int:
        """Drop a reference; delete the id when none remain. Returns the remaining count."""
        ...
    def items(self) -> Iterator[tuple[int, str, int]]:
        """(id, key, references) for every allocated identity."""
        ...
    def replace_all(self, rows: dict[int, tuple[str, int]]) -> None:
        """Make the store hold exactly ``rows`` {id: (key, references)}, atomically."""
        ...


class MemoryBackend:
    """The in-memory twin of the stores."""

    def __init__(self) -> None:
        self._by_key: dict[str, int] = {}
        self._by_id: dict[int, tuple[str, int]] = {}

    def lookup(self, key: str) -> int | None:
        return self._by_key.get(key)

    def get(self, ident: int) -> str | None:
        hit = self._by_id.get(ident)
        return hit[0] if hit else None

    def acquire(self, key: str, lowest_free_from: int) -> int:
        ident = self._by_key.get(key)
        if ident is None:
            ident = lowest_free_from
            while ident in self._by_id:
                ident += 1
            if ident > MAX_IDENTITY:
                raise IdentityExhausted("no free identity left")
            self._by_key[key] = ident
            self._by_id[ident] = (key, 0)
        k, refs = self._by_id[ident]
        self._by_id[ident] = (k, refs + 1)
        return ident

    def release(self, ident: int) -> int:
        hit = self._by_id.get(ident)
        if hit is None:
            return 0
        key, refs = hit
        refs -= 1
        if refs <= 0:
            del self._by_id[ident]
            del self._by_key[key]
            return 0
        self._by_id[ident] = (key, refs)
        return refs

    def items(self) -> Iterator[tuple[int, str, int]]:
        for ident, (key, refs) in sorted(self._by_id.items()):
            yield ident, key, refs

    def replace_all(self, rows: dict[int, tuple[str, int]]) -> None:
        self._by_id = dict(rows)
        self._by_key = {key: ident for ident, (key, _refs) in rows.items()}


class Allocator:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._reserved = reserved_identity_labels()
        self._reserved_by_key = {labels_key(v): k for k, v in self._reserved.items()}

    def allocate(self, labels: LabelSet) -> int:
        """Take a reference on the identity of ``labels``."""
        key = labels_key(labels)
        reserved = self._reserved_by_key.get(key)
        if reserved is not None:
            return reserved
        return self.backend.acquire(key, MIN_ALLOCATED_ID)

    def release(self, ident: int) -> int:
        if ident < MIN_ALLOCATED_ID:
            return 1
        return self.backend.release(ident)

    def lookup(self, labels: LabelSet) -> int | None:
        key = labels_key(labels)
        reserved = self._reserved_by_key.get(key)
        if reserved is not None:
            return reserved
        return self.backend.lookup(key)

    def labels(self, ident: int) -> LabelSet | None:
        if ident in self._reserved:
            return self._reserved[ident]
        key = self.backend.get(ident)
        return None if key is None else key_labels(key)

    def labels_fresh(self, ident: int) -> LabelSet | None:
        """`labels`, re-read from a shared store whose cache may be stale (an id that
        another node freed and re-allocated to other labels)."""
        refresh = getattr(self.backend, "refresh", None)
        if refresh is None or ident in self._reserved:
            return self.labels(ident)
        key = refresh(ident)
        return None if key is None else key_labels(key)

    def all(self) -> dict[int, LabelSet]:
        out = dict(self._reserved)
        for ident, key, _refs in self.backend.items():
            out[ident] = key_labels(key)
        return out

    def reconcile_holders(self, holders: list[tuple[int, LabelSet]]) -> dict[str, int]:
        """After a restart: references become exactly the live holders.

        A crash can leave a count too high (an allocation whose holder was
        never recorded) or too low (a release repeated by the recovery).
        Identities nobody holds are freed; held ones are (re)written with
        their labels. Returns how many counts were corrected and freed.
        """
        rows: dict[int, tuple[str, int]] = {}
        for ident, labels in holders:
            if ident < MIN_ALLOCATED_ID:
                continue
            key, refs = rows.get(ident, (labels_key(labels), 0))
            rows[ident] = (key, refs + 1)
        before = {ident: (key, refs) for ident, key, refs in self.backend.items()}
        fixed = sum(1 for i, row in rows.items() if before.get(i) != row)
        freed = sum(1 for i in before if i not in rows)
        if fixed or freed:
            self.backend.replace_all(rows)
        return {"corrected": fixed, "freed": freed}

    def references(self) -> dict[int, int]:
        return {ident: refs for ident, _key, refs in self.backend.items()}


__all__ = [
    "MAX_IDENTITY",
    "MIN_ALLOCATED_ID",
    "RESERVED_IDENTITIES",
    "Allocator",
    "Backend",
    "IdentityExhausted",
    "MemoryBackend",
    "labels_key",
]
