"""Matching label selectors against identities, one at a time or all at once.

`matches` evaluates one selector against one label set. `SelectorCache`
answers "which identities does this selector select" for every selector the
policy uses, and keeps the answers current as identities come and go:

* the identities' labels are indexed (``(source, key, value) -> ids`` and
  ``(key, value) -> ids`` for the ``any`` source), so a selector is answered
  by intersecting a few sets instead of testing every identity;
* answers are cached per selector value (selectors are frozen dataclasses);
* `add_identity`/`remove_identity` update every cached answer with one
  `matches` call each and report which selectors changed, which is what the
  resolver needs to recompute only the affected endpoints.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from flagella.policy.api import LabelSelector, Requirement
from flagella.policy.labels import Label, LabelSet


def split_key(key: str) -> tuple[str, str]:
    """``k8s:app`` -> (``k8s``, ``app``); a key without source is ``any``."""
    source, sep, name = key.partition(":")
    if not sep:
        return "any", key
    return source, name


def _values(labels: LabelSet, key: str) -> list[str]:
    source, name = split_key(key)
    return [
        lab.value
        for lab in labels
        if lab.key == name and (source == "any" or lab.source == source)
    ]


def requirement_matches(req: Requirement, labels: LabelSet) -> bool:
    values = _values(labels, req.key)
    if req.operator == "In":
        return any(v in req.values for v in values)
    if req.operator == "NotIn":
        return not any(v in req.values for v in values)
    if req.operator == "Exists":
        return bool(values)
    return not values  # DoesNotExist


def matches(selector: LabelSelector, labels: LabelSet) -> bool:
    """Whether ``selector`` selects an identity with ``labels``."""
    for key, value in selector.match_labels:
        if value not in _values(labels, key):
            return False
    return all(requirement_matches(req, labels) for req in selector.match_expressions)


class _LabelIndex:
    """Inverted index of identity labels."""

    def __init__(self) -> None:
        self.all: set[int] = set()
        self.by_value: dict[tuple[str, str, str], set[int]] = defaultdict(set)
        self.by_key: dict[tuple[str, str], set[int]] = defaultdict(set)

    def _entries(self, label: Label) -> Iterable[tuple[str, str, str]]:
        yield (label.source, label.key, label.value)
        yield ("any", label.key, label.value)

    def add(self, ident: int, labels: LabelSet) -> None:
        self.all.add(ident)
        for label in labels:
            for src, key, value in self._entries(label):
                self.by_value[(src, key, value)].add(ident)
                self.by_key[(src, key)].add(ident)

    def remove(self, ident: int, labels: LabelSet) -> None:
        self.all.discard(ident)
        for label in labels:
            for src, key, value in self._entries(label):
                self.by_value[(src, key, value)].discard(ident)
                self.by_key[(src, key)].discard(ident)

    def _with_value(self, key: str, values: Iterable[str]) -> set[int]:
        source, name = split_key(key)
        out: set[int] = set()
        for v in values:
            out |= self.by_value.get((source, name, v), set())
        return out

    def _with_key(self, key: str) -> set[int]:
        source, name = split_key(key)
        return self.by_key.get((source, name), set())

    def select(self, selector: LabelSelector) -> set[int]:
        result: set[int] | None = None

        def narrow(ids: set[int]) -> None:
            nonlocal result
            result = set(ids) if result is None else result & ids

        for key, value in selector.match_labels:
            narrow(self._with_value(key, (value,)))
        negative: list[set[int]] = []
        for req in selector.match_expressions:
            if req.operator == "In":
                narrow(self._with_value(req.key, req.values))
            elif req.operator == "Exists":
                narrow(self._with_key(req.key))
            elif req.operator == "NotIn":
                negative.append(self._with_value(req.key, req.values))
            else:
                negative.append(self._with_key(req.key))
        out = set(self.all) if result is None else result
        for ids in negative:
            out -= ids
        return out


class SelectorCache:
    """Selector -> the ids of the identities it selects, kept current."""

    def __init__(self, identities: Mapping[int, LabelSet] | None = None) -> None:
        self._labels: dict[int, LabelSet] = {}
        self._index = _LabelIndex()
        self._cache: dict[LabelSelector, frozenset[int]] = {}
        for ident, labels in (identities or {}).items():
            self.add_identity(ident, labels)

    @property
    def identities(self) -> Mapping[int, LabelSet]:
        return self._labels

    def labels(self, ident: int) -> LabelSet | None:
        return self._labels.get(ident)

    def with_label(self, label: Label) -> set[int]:
        """The identities that carry exactly ``label`` (an index lookup; do not mutate)."""
        return self._index.by_value.get((label.source, label.key, label.value), set())

    def all_ids(self) -> set[int]:
        return self._index.all

    def select(self, selector: LabelSelector) -> frozenset[int]:
        hit = self._cache.get(selector)
        if hit is None:
            hit = frozenset(self._index.select(selector))
            self._cache[selector] = hit
        return hit

    def add_identity(self, ident: int, labels: LabelSet) -> list[LabelSelector]:
        """Add (or relabel) an identity; return the cached selectors whose answer changed."""
        changed = []
        old = self._labels.get(ident)
        if old is not None:
            if old == labels:
                return []
            changed = self.remove_identity(ident)
        self._labels[ident] = labels
        self._index.add(ident, labels)
        for sel, ids in self._cache.items():
            if matches(sel, labels):
                self._cache[sel] = ids | {ident}
                changed.append(sel)
        return changed

    def remove_identity(self, ident: int) -> list[LabelSelector]:
        labels = self._labels.pop(ident, None)
        if labels is None:
            return []
        self._index.remove(ident, labels)
        changed = []
        for sel, ids in self._cache.items():
            if ident in ids:
                self._cache[sel] = ids - {ident}
                changed.append(sel)
        return changed
