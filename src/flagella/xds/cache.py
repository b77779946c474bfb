"""The resource cache: serialize once, version by content, fan out bytes.

A caller sets resources by type URL, either globally or for one node. Each
resource is serialized exactly once, when it is set: `CachedResource` holds the
`Any` bytes, the resource version (a hash of those bytes) and the encoded
response fields for SotW and delta, built on first use and then shared by
every stream. `serializations` counts the protobuf serializations, so a test
or a benchmark can check that a change costs one serialization per changed
resource, whatever the number of streams.

A node's view of a type is the base resources overlaid with the global ones,
overlaid with the node's own (a node resource replaces a global one of the
same name, a global one a base one). The base layer holds what one owner
guarantees every node (Istio's deny-all ``flagella.rbac``) while another owner
replaces the global set of the same type wholesale (the node proxy's filters). Its version is a
hash of the sorted (name, resource version) pairs, so equal content means an
equal version whatever the path that led to it (full sets or increments).
Views are memoized and dropped when their type changes.

No I/O here; the grpc services read views from this cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from flagella.xds._wire import field_bytes, field_str

_ANY_TYPE_URL = 1
_ANY_VALUE = 2
_SOTW_RESOURCES = 2
_RESOURCE_VERSION = 1
_RESOURCE_RESOURCE = 2
_RESOURCE_NAME = 3
_DELTA_RESOURCES = 2


class Message(Protocol):
    """What we need of a protobuf message."""

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...  # noqa: N802


@dataclass(eq=False)
class CachedResource:
    """One resource, serialized once; its encoded response fields are shared by every stream."""

    name: str
    type_url: str
    value: bytes
    version: str
    _sotw_field: bytes | None = field(default=None, repr=False)
    _delta_field: bytes | None = field(default=None, repr=False)

    @property
    def any_bytes(self) -> bytes:
        return field_str(_ANY_TYPE_URL, self.type_url) + field_bytes(_ANY_VALUE, self.value)

    @property
    def sotw_field(self) -> bytes:
        """`DiscoveryResponse.resources` entry (an `Any`)."""
        if self._sotw_field is None:
            self._sotw_field = field_bytes(_SOTW_RESOURCES, self.any_bytes)
        return self._sotw_field

    @property
    def delta_field(self) -> bytes:
        """`DeltaDiscoveryResponse.resources` entry (a `Resource` wrapping the `Any`)."""
        if self._delta_field is None:
            inner = (
                field_str(_RESOURCE_VERSION, self.version)
                + field_bytes(_RESOURCE_RESOURCE, self.any_bytes)
                + field_str(_RESOURCE_NAME, self.name)
            )
            self._delta_field = field_bytes(_DELTA_RESOURCES, inner)
        return self._delta_field


def content_version(items: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for name, version in sorted(items):
        digest.update(name.encode() + b"\0" + version.encode() + b"\n")
    return digest.hexdigest()[:16]


def subset_version(view: TypeView, names: Collection[str]) -> str:
    """The content version of the resources of ``view`` named in ``names`` (those present):
    what a stream subscribed to ``names`` is sent. Equals ``view.version`` when ``names``
    covers the view (without hashing again)."""
    wanted = named_resources(view, names)
    return view.version if len(wanted) == len(view.resources) else content_version(
        (n, r.version) for n, r in wanted.items()
    )


def named_resources(view: TypeView, names: Collection[str]) -> dict[str, CachedResource]:
    """The resources of ``view`` named in ``names`` (those present), walking the smaller
    of the two: a sidecar names a few filters of a view that may hold the node proxy's
    thousands, once per stream and change."""
    if len(names) < len(view.resources):
        return {n: view.resources[n] for n in names if n in view.resources}
    return {n: r for n, r in view.resources.items() if n in names}


@dataclass(frozen=True)
class TypeView:
    """What one node should have of one type, and its content version."""

    type_url: str
    resources: Mapping[str, CachedResource]
    version: str


_EMPTY: dict[str, CachedResource] = {}


class ResourceCache:
    """Global and per-node resources by type URL, with memoized per-node views."""

    def __init__(self) -> None:
        self._base: dict[str, dict[str, CachedResource]] = {}
        self._global: dict[str, dict[str, CachedResource]] = {}
        self._nodes: dict[str, dict[str, dict[str, CachedResource]]] = {}
        self._views: dict[tuple[str, str], TypeView] = {}
        self.serializations = 0

    def _resource(self, type_url: str, name: str, message: Message) -> CachedResource:
        value = message.SerializeToString(deterministic=True)
        self.serializations += 1
        version = hashlib.sha256(value).hexdigest()[:16]
        return CachedResource(name=name, type_url=type_url, value=value, version=version)

    def _table(self, type_url: str, node: str | None) -> dict[str, CachedResource]:
        if node is None:
            return self._global.setdefault(type_url, {})
        return self._nodes.setdefault(node, {}).setdefault(type_url, {})

    def _invalidate(self, type_url: str, node: str | None) -> None:
        for key in [k for k in self._views if k[1] == type_url and (node is None or k[0] == node)]:
            del self._views[key]

    def set_resources(
        self, type_url: str, resources: Mapping[str, Message], node: str | None = None
    ) -> None:
        """Replace the whole set of `type_url` (globally, or for `node`)."""
        table = self._table(type_url, node)
        table.clear()
        for name in sorted(resources):
            table[name] = self._resource(type_url, name, resources[name])
        self._invalidate(type_url, node)

    def set_base(self, type_url: str, resources: Mapping[str, Message]) -> None:
        """Replace the base set of `type_url`: what every node has unless the global
        set or its own names the same resource (`set_resources` leaves it alone)."""
        table = self._base.setdefault(type_url, {})
        table.clear()
        for name in sorted(resources):
            table[name] = self._resource(type_url, name, resources[name])
        self._invalidate(type_url, None)

    def update(
        self,
        type_url: str,
        upserts: Mapping[str, Message] | None = None,
        removals: Iterable[str] = (),
        node: str | None = None,
    ) -> None:
        """Change some resources of `type_url`: serializes only the upserted ones."""
        table = self._table(type_url, node)
        for name in removals:
            table.pop(name, None)
        for name, message in (upserts or {}).items():
            table[name] = self._resource(type_url, name, message)
        self._invalidate(type_url, node)

    def forget_node(self, node: str) -> None:
        self._nodes.pop(node, None)
        for key in [k for k in self._views if k[0] == node]:
            del self._views[key]

    def view(self, node: str, type_url: str) -> TypeView:
        key = (node, type_url)
        cached = self._views.get(key)
        if cached is not None:
            return cached
        merged = dict(self._base.get(type_url, _EMPTY))
        merged.update(self._global.get(type_url, _EMPTY))
        merged.update(self._nodes.get(node, {}).get(type_url, _EMPTY))
        view = TypeView(
            type_url=type_url,
            resources=merged,
            version=content_version((n, r.version) for n, r in merged.items()),
        )
        self._views[key] = view
        return view

    def type_urls(self, node: str) -> set[str]:
        return set(self._base) | set(self._global) | set(self._nodes.get(node, {}))
