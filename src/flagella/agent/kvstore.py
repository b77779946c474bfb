"""Cluster mode: this node's ipcache entries and node record in etcd, the others' out of it.

Theory of operation. One controller (``kvstore-sync``) runs every
``kvstore.sync_interval_s``:

1. **Read** (no agent lock): one range over ``kvstore.cluster_prefix``, the whole
   cluster's node records and endpoint entries, with the lease of each key.
2. **Apply** (under the agent lock, `AgentCore.apply_cluster`): the pure
   `flagella.ipcache.ClusterState` diffs the read against the last one; the
   other nodes' endpoint addresses go into the ipcache with their identities,
   their node IPs as ``reserved:remote-node``; the labels of identities new to
   this node are looked up by id (the allocator's etcd backend) and handed to
   the policy engine, so selectors match remote pods; affected endpoints
   regenerate.
3. **Publish** (no lock): this node's keys (`AgentCore.cluster_entries`) are
   reconciled against what the read found: missing or different ones (a value,
   or a lease that is not this node's current lease) are put on the node's
   lease, stale ones deleted. Level-based, so a lease that expired in an
   outage, a key deleted by hand or a restarted agent all converge on the next
   run.

This is polling, not an etcd watch: the JSON gateway streams watches, but a
full read per interval is simpler to make correct across outages (no
revision bookkeeping, no compaction handling). A run first asks whether
anything changed, with two small reads: the names of keys under the prefix
modified after the last full read's revision (etcd filters by revision only
the keys it returns, so this is ``keys_only``, not ``count_only``), and the
number of keys under the prefix. Any change makes one of
them move (a put or a lease change modifies a key; a delete, by hand or by an
expired lease, lowers the count unless a put raised it, and that put is
modified). When neither moved and this node's own keys are what it last
published, the run ends there: at 10,000 entries 11-13 ms instead of
170-175 ms of read and diff (BENCHMARKS, cluster state).

Outage: a failed read or publish fails the controller run and changes
nothing: the ipcache and policy keep what the last successful read gave, so
the node keeps enforcing from its cache; the first run after etcd answers
again catches up both ways.

A second controller (``identity-gc``) runs the allocator backend's ``gc()``:
identities whose every reference expired with dead agents are freed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from flagella.identity import EtcdBackend
from flagella.identity._etcd_client import EtcdClient, delete, put, unb64

_T = TypeVar("_T")

#: Operations per publish txn (etcd's default limit is 128).
TXN_OPS = 64


class ClusterSync:
    """The I/O half of cluster mode over the node's `EtcdBackend` session."""

    def __init__(self, backend: EtcdBackend, prefix: str) -> None:
        self.backend = backend
        self.prefix = prefix.rstrip("/")
        #: The last full read that was applied and published: (revision, key count), and
        #: the session's lease then (a new session, after an outage, reads in full).
        self._seen: tuple[int, int] | None = None
        self._seen_lease = 0
        self._published: dict[str, str] | None = None
        self.full_reads = 0
        self.skipped = 0

    def read(self) -> list[tuple[str, str, int]]:
        """(key, value, lease) of every key under the prefix."""
        return self.read_at()[0]

    def read_at(self) -> tuple[list[tuple[str, str, int]], int]:
        """`read`, and the etcd revision it was read at."""
        async def work(client: EtcdClient, _lease: int) -> tuple[list[tuple[str, str, int]], int]:
            answer = await client.range(self.prefix + "/", prefix=True)
            rows = [
                (unb64(kv["key"]), unb64(kv.get("value", "")), int(kv.get("lease", 0)))
                for kv in answer.get("kvs", [])
            ]
            return rows, int(answer["header"]["revision"])

        return self.backend.session(work)

    def _quiet(self) -> bool:
        """Nothing changed in etcd since the last full run, in the same session."""
        if self._seen is None or self._seen_lease != self.backend.lease:
            return False
        return not self.changed_since(*self._seen)

    def changed_since(self, revision: int, count: int) -> bool:
        """Whether any key under the prefix was put after ``revision``, or the number of
        keys is no longer ``count`` (module docstring)."""

        async def work(client: EtcdClient, _lease: int) -> bool:
            newer = await client.range(self.prefix + "/", prefix=True, keys_only=True,
                                       min_mod_revision=revision + 1)
            if newer.get("kvs") or int(newer["header"]["revision"]) < revision:
                return True  # a put since; or an etcd restored to an older revision
            total = await client.range(self.prefix + "/", prefix=True, count_only=True)
            return int(total.get("count", 0)) != count

        return self.backend.session(work)

    def publish(self, desired: dict[str, str], own: list[tuple[str, str, int]]) -> tuple[int, int]:
        """Make this node's keys ``desired`` (``own``: what the read found of them).

        Returns (puts, deletes)."""

        async def work(client: EtcdClient, lease: int) -> tuple[int, int]:
            have = {key: (value, kv_lease) for key, value, kv_lease in own}
            ops: list[dict[str, Any]] = [
                put(key, value, lease) for key, value in sorted(desired.items()) if have.get(key) != (value, lease)
            ]
            n_puts = len(ops)
            ops += [delete(key) for key in sorted(have) if key not in desired]
            for i in range(0, len(ops), TXN_OPS):
                await client.txn([], ops[i : i + TXN_OPS], [])
            return n_puts, len(ops) - n_puts

        return self.backend.session(work)

    def own_keys(self, node: str, rows: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
        mine = (f"{self.prefix}/nodes/{node}", f"{self.prefix}/ip/{node}/")
        return [r for r in rows if r[0] == mine[0] or r[0].startswith(mine[1])]

    def run(
        self,
        apply: Callable[[list[tuple[str, str]]], dict[str, str]],
        locked: Callable[[Callable[[], dict[str, str]]], dict[str, str]],
        own: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        """One controller run: read, apply under the agent lock (``locked``), publish.
        With ``own`` (this node's keys as they should be, `AgentCore.cluster_entries`), a
        run in which nothing changed, in etcd or here, stops after two small reads."""
        if own is not None and self._quiet() and locked(own) == self._published:
            self.skipped += 1
            return
        rows, revision = self.read_at()
        self.full_reads += 1
        desired = locked(lambda: apply([(k, v) for k, v, _lease in rows]))
        self.publish(desired, self.own_keys(self.backend.node, rows))
        self._seen, self._published = (revision, len(rows)), desired
        self._seen_lease = self.backend.lease


def cluster_backend(backend: object) -> EtcdBackend | None:
    """The backend when it is etcd (cluster mode), else None."""
    return backend if isinstance(backend, EtcdBackend) else None


__all__ = ["ClusterSync", "cluster_backend", "run_locked"]


async def run_locked(lock: asyncio.Lock, fn: Callable[[], _T]) -> _T:
    """Run blocking ``fn`` in the loop's executor while holding the agent ``lock``."""
    async with lock:
        return await asyncio.get_running_loop().run_in_executor(None, fn)
