"""Numeric identities for label sets.

The same sorted security-relevant label set always gets the same numeric
identity. Reserved identities are fixed (host=1, world=2, ...); allocated
ones start at 256. `Allocator` is the pure core over a `Backend`;
`SQLiteBackend` (the embedded default, a file in the state dir),
`EtcdBackend` (shared by the nodes of a cluster) and `MemoryBackend` (the
in-memory twin) implement it.
"""

from flagella.identity._allocator import (
    MAX_IDENTITY,
    MIN_ALLOCATED_ID,
    RESERVED_IDENTITIES,
    Allocator,
    Backend,
    MemoryBackend,
    labels_key,
)
from flagella.identity._etcd import EtcdBackend, KvstoreError, KvstoreUnavailable
from flagella.identity._sqlite import SQLiteBackend

__all__ = [
    "MAX_IDENTITY",
    "MIN_ALLOCATED_ID",
    "RESERVED_IDENTITIES",
    "Allocator",
    "Backend",
    "EtcdBackend",
    "KvstoreError",
    "KvstoreUnavailable",
    "MemoryBackend",
    "SQLiteBackend",
    "labels_key",
]
