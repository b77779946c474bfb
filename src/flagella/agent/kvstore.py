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
revision bookkeeping, no compaction handling) and costs one range per node
per second at test scale. A cluster of thousands of pods wants the watch.

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

    def read(self) -> list[tuple[str, str, int]]:
        """(key, value, lease) of every key under the prefix."""

        async def work(client: EtcdClient, _lease: int) -> list[tuple[str, str, int]]:
            answer = await client.range(self.prefix + "/", prefix=True)
            return [
                (unb64(kv["key"]), unb64(kv.get("value", "")), int(kv.get("lease", 0)))
                for kv in answer.get("kvs", [])
            ]

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
    ) -> None:
        """One controller run: read, apply under the agent lock (``locked``), publish."""
        rows = self.read()
        desired = locked(lambda: apply([(k, v) for k, v, _lease in rows]))
        self.publish(desired, self.own_keys(self.backend.node, rows))


def cluster_backend(backend: object) -> EtcdBackend | None:
    """The backend when it is etcd (cluster mode), else None."""
    return backend if isinstance(backend, EtcdBackend) else None


__all__ = ["ClusterSync", "cluster_backend", "run_locked"]


async def run_locked(lock: asyncio.Lock, fn: Callable[[], _T]) -> _T:
    """Run blocking ``fn`` in the loop's executor while holding the agent ``lock``."""
    async with lock:
        return await asyncio.get_running_loop().run_in_executor(None, fn)
