"""The cluster identity store: etcd, shared by every node's agent.

Theory of operation (Cilium's kvstore allocator, made race-free with txns).
Under ``<prefix>/`` etcd holds, per identity N of label key K:

- ``id/N = K`` and ``label/K = N``: the master keys, without lease. They are
  created together in ONE transaction that requires both to be absent
  (``create_revision == 0``), so two nodes can never give N to two label sets,
  nor two ids to K: the loser's txn fails, its failure branch reads who won,
  and it retries (with the winner's id, or with another candidate id).
- ``ref/<sha256(K)>/<node> = N``: this node's reference, bound to the node's
  lease. A node holds one such key while it has local references (the local
  counts live in memory); when the agent dies its lease expires and its
  references vanish with it.

Taking a reference to a known id is a txn ``value(label/K) == N`` -> put
``label/K`` again (bumping its mod_revision) and the ref key. Garbage
collection of K (after the last local release, and in `gc` sweeps for
references that expired with dead agents) counts ``ref/<sha>/`` and, if it is
empty, deletes the master keys in a txn guarded by ``mod(label/K)`` as read
before the count: a reference taken in between bumped it, so the delete fails.

Ids: a node takes the lowest id free in its cache (what the SQLite store and
the in-memory twin do) until its txn collides with another node's id; then,
for the next `CONTENDED_FOR` allocations, it allocates upwards from a random
base in a wide span (a new base after each collision), so racing nodes
spread out into regions of their own instead of all fighting over the same
lowest ids (Cilium picks random ids for the same reason). Concurrent allocations on one node keep their candidate
ids apart (``_pending``).

Outage: every identity this node knows stays in its cache, so lookups and new
references to identities it already holds work without etcd. Allocating an
identity it does not hold raises `KvstoreUnavailable` (nothing is partly
applied). Releases during an outage are remembered. A keepalive task renews the
lease every ``ttl/3``; when etcd answers again it re-grants the lease if it
expired and re-writes every held reference (re-creating master keys that
were collected meanwhile, with the same id when it is still free; otherwise
the new id is recorded in `reassigned`), and finishes the remembered releases.

The `Backend` protocol is synchronous; the backend runs its own event loop in
a daemon thread and the sync methods wait on it. `acquire_many` exposes the
pipelined path (many txns in flight) for bulk allocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

from flagella.identity._allocator import MAX_IDENTITY, MIN_ALLOCATED_ID, IdentityExhausted
from flagella.identity._etcd_client import (
    EtcdClient,
    KvstoreError,
    KvstoreUnavailable,
    absent,
    delete,
    get,
    kv_pairs,
    mod_is,
    put,
    responses,
    value_is,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: After an id collision with another node, this many allocations pick random
#: candidates among ``CONTENDED_SPAN`` (or 4x the known ids) instead of the lowest free.
CONTENDED_FOR = 1024
CONTENDED_SPAN = 1 << 16

#: New identities created per txn by `acquire_many` (3 puts each; etcd allows 128 ops).
BATCH = 32

#: Attempts of one allocation before giving up (each failed attempt taught us a winner).
MAX_ATTEMPTS = 64


class EtcdBackend:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        node: str,
        prefix: str = "flagella/identities",
        lease_ttl_s: int = 15,
        timeout_s: float = 2.0,
        connections: int = 16,
    ) -> None:
        if not node or "/" in node:
            raise KvstoreError(f"kvstore node name {node!r}: must be non-empty, without '/'")
        if lease_ttl_s < 2:
            raise KvstoreError("kvstore.lease_ttl_s: must be at least 2")
        self.node = node
        self.prefix = prefix.rstrip("/")
        self.lease_ttl_s = lease_ttl_s
        self.lease: int = 0
        self.online = False
        self.reassigned: dict[str, tuple[int, int]] = {}  # key -> (old id, new id) after an outage
        self._by_key: dict[str, int] = {}
        self._by_id: dict[int, str] = {}
        self._refs: dict[int, int] = {}
        self._unreleased: dict[int, str] = {}  # released during an outage: ref keys to delete
        self._pending: set[int] = set()
        self._contended = 0
        self._region = 0
        self._key_locks: dict[str, asyncio.Lock] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"etcd-{node}", daemon=True)
        self._thread.start()
        self._client = EtcdClient(endpoints, timeout_s=timeout_s, connections=connections)
        self._connections = connections
        self._wake = asyncio.Event()
        self._stopping = False
        try:
            self._call(self._connect())
        except KvstoreUnavailable as exc:
            log.warning("etcd not reachable at start, will retry: %s", exc)
        self._keeper = asyncio.run_coroutine_threadsafe(self._keepalive(), self._loop)

    # -- plumbing ---------------------------------------------------------------

    def _call(self, coro: Awaitable[_T]) -> _T:
        async def run() -> _T:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def _k(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    def _ref(self, key: str) -> str:
        return self._k("ref", hashlib.sha256(key.encode()).hexdigest(), self.node)

    def _ref_dir(self, key: str) -> str:
        return self._k("ref", hashlib.sha256(key.encode()).hexdigest(), "")

    async def _etcd(self, coro: Awaitable[_T]) -> _T:
        try:
            return await coro
        except KvstoreUnavailable:
            self._offline()
            raise
        except KvstoreError as exc:
            if "lease not found" in str(exc):
                self.lease = 0
                self._offline()
                raise KvstoreUnavailable(f"etcd lost this node's lease: {exc}") from None
            raise

    def _offline(self) -> None:
        if self.online:
            log.warning("etcd unreachable: node %s works from its cache", self.node)
        self.online = False
        self._wake.set()

    def _learn(self, key: str, ident: int) -> None:
        old = self._by_key.get(key)
        if old is not None and old != ident and self._by_id.get(old) == key:
            del self._by_id[old]
        self._by_key[key] = ident
        self._by_id[ident] = key

    def _forget(self, key: str, ident: int) -> None:
        if self._by_key.get(key) == ident:
            del self._by_key[key]
        if self._by_id.get(ident) == key:
            del self._by_id[ident]

    # -- connection, lease, catch-up ------------------------------------------

    async def _connect(self) -> None:
        if not self.lease or await self._client.lease_keepalive(self.lease) <= 0:
            self.lease = await self._client.lease_grant(self.lease_ttl_s)
        answer = await self._client.range(self._k("label", ""), prefix=True)
        for key_path, value, _rev in kv_pairs(answer):
            self._learn(key_path[len(self._k("label", "")) :], int(value))
        self.online = True
        await self._catch_up()

    async def _catch_up(self) -> None:
        for ident, key in sorted(self._unreleased.items()):
            if ident not in self._refs:
                await self._client.txn([], [delete(self._ref(key))], [])
                await self._collect(key)
            del self._unreleased[ident]
        for ident in sorted(self._refs):
            new = await self._restore(self._by_id[ident], ident)
            if new != ident:
                key = self._by_id[new]
                log.warning("identity of %s moved from %d to %d after an etcd outage", key, ident, new)
                self.reassigned[key] = (ident, new)
                self._refs[new] = self._refs.pop(ident)

    async def _keepalive(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.lease_ttl_s / 3)
            self._wake.clear()
            if self._stopping:
                return
            try:
                if self.online and self.lease and await self._client.lease_keepalive(self.lease) > 0:
                    continue
                was = "lease expired" if self.online else "reconnected"
                await self._connect()
                log.info("etcd: %s, node %s caught up", was, self.node)
            except KvstoreError as exc:
                self.online = False
                log.debug("etcd keepalive failed: %s", exc)
                await asyncio.sleep(min(1.0, self.lease_ttl_s / 3))

    def wait_online(self, timeout_s: float = 10.0) -> bool:
        """Wake the keepalive task and wait until it reconnected (for tests and start-up)."""

        async def wait() -> bool:
            deadline = self._loop.time() + timeout_s
            while not self.online and self._loop.time() < deadline:
                self._wake.set()
                await asyncio.sleep(0.05)
            return self.online

        return self._call(wait())

    def close(self, *, revoke: bool = True) -> None:
        """Stop; with ``revoke`` drop the lease (this node's references go at once)."""

        async def stop() -> None:
            self._stopping = True
            keeper.cancel()
            if revoke and self.lease and self.online:
                with contextlib.suppress(KvstoreError):
                    await self._client.lease_revoke(self.lease)
            await self._client.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._loop.is_closed():
            return
        keeper = self._keeper
        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    # -- allocation ---------------------------------------------------------------

    def _candidate(self, lowest: int, attempt: int) -> int:
        taken = self._by_id.keys() | self._pending
        if attempt or self._contended:
            # other nodes are allocating too: the lowest free ids are theirs by now.
            # Allocate upwards from a random base of our own until that collides.
            span = min(MAX_IDENTITY - lowest, max(CONTENDED_SPAN, 16 * len(taken)))
            if self._region < lowest or self._region > lowest + span:
                self._region = lowest + random.randrange(span)
            ident = self._region
            while ident in taken:
                ident += 1
            if ident <= MAX_IDENTITY:
                return ident
        ident = lowest
        while ident in taken:
            ident += 1
        if ident > MAX_IDENTITY:
            raise IdentityExhausted("no free identity left")
        return ident

    def _collided(self) -> None:
        """Another node took an id we tried: spread out (see `_candidate`)."""
        self._contended = CONTENDED_FOR
        self._region = 0

    async def _take(self, key: str, lowest: int) -> int:
        """One cluster reference for ``key``: its existing id, or a new one. Not locked."""
        for attempt in range(MAX_ATTEMPTS):
            if not self.online:
                raise KvstoreUnavailable("this node is offline")
            label_key = self._k("label", key)
            known = self._by_key.get(key)
            if known is not None:
                answer = await self._etcd(
                    self._client.txn(
                        [value_is(label_key, str(known))],
                        [put(label_key, str(known)), put(self._ref(key), str(known), self.lease)],
                        [get(label_key)],
                    )
                )
                if answer.get("succeeded"):
                    return known
                self._forget(key, known)
                for _k, value, _rev in kv_pairs(responses(answer)[0]):
                    self._learn(key, int(value))
                continue
            ident = self._candidate(lowest, attempt)
            id_key = self._k("id", str(ident))
            self._pending.add(ident)
            try:
                answer = await self._etcd(
                    self._client.txn(
                        [absent(label_key), absent(id_key)],
                        [
                            put(id_key, key),
                            put(label_key, str(ident)),
                            put(self._ref(key), str(ident), self.lease),
                        ],
                        [get(label_key), get(id_key)],
                    )
                )
            finally:
                self._pending.discard(ident)
            if answer.get("succeeded"):
                self._learn(key, ident)
                self._contended = max(0, self._contended - 1)
                return ident
            by_label, by_id = responses(answer)
            if by_id.get("kvs") and not by_label.get("kvs"):
                self._collided()
            for _k, value, _rev in kv_pairs(by_label):
                self._learn(key, int(value))
            for _k, value, _rev in kv_pairs(by_id):
                self._learn(value, ident)
        raise KvstoreError(f"allocating an identity for {key!r}: no progress after {MAX_ATTEMPTS} attempts")

    async def _acquire(self, key: str, lowest: int) -> int:
        known = self._by_key.get(key)
        if known is not None and self._refs.get(known, 0) > 0:
            self._refs[known] += 1
            return known
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        async with lock:
            known = self._by_key.get(key)
            if known is not None and self._refs.get(known, 0) > 0:
                self._refs[known] += 1
                return known
            try:
                ident = await self._take(key, lowest)
            except KvstoreUnavailable as exc:
                raise KvstoreUnavailable(
                    f"etcd unreachable: cannot allocate an identity for {key!r} (known ones still work): {exc}"
                ) from None
            self._refs[ident] = self._refs.get(ident, 0) + 1
            self._unreleased.pop(ident, None)
        return ident

    async def _restore(self, key: str, ident: int) -> int:
        """Re-write this node's reference to ``key`` (after an outage): its id, maybe a new one."""
        label_key, id_key = self._k("label", key), self._k("id", str(ident))
        answer = await self._client.txn(
            [absent(label_key), absent(id_key)],
            [put(id_key, key), put(label_key, str(ident)), put(self._ref(key), str(ident), self.lease)],
            [get(label_key)],
        )
        if answer.get("succeeded"):
            return ident
        for _k, value, _rev in kv_pairs(responses(answer)[0]):
            self._learn(key, int(value))
        if self._by_key.get(key) != ident:
            self._forget(key, ident)
        try:
            return await self._take(key, MIN_ALLOCATED_ID)
        except BaseException:
            if key not in self._by_key:
                self._learn(key, ident)  # still held here: the next catch-up retries it
            raise

    async def _release(self, ident: int) -> int:
        refs = self._refs.get(ident, 0)
        if refs <= 0:
            return 0
        if refs > 1:
            self._refs[ident] = refs - 1
            return refs - 1
        del self._refs[ident]
        key = self._by_id.get(ident)
        if key is None:
            return 0
        if not self.online:
            self._unreleased[ident] = key
            return 0
        try:
            await self._etcd(self._client.txn([], [delete(self._ref(key))], []))
            await self._etcd(self._collect(key))
        except KvstoreUnavailable:
            self._unreleased[ident] = key
        return 0

    async def _collect(self, key: str) -> bool:
        """Delete ``key``'s master keys if no node references it any more."""
        label_key = self._k("label", key)
        hit = kv_pairs(await self._client.range(label_key))
        if not hit:
            return False
        _k, value, rev = hit[0]
        count = int((await self._client.range(self._ref_dir(key), prefix=True, count_only=True)).get("count", 0))
        if count:
            return False
        ident = int(value)
        answer = await self._client.txn(
            [mod_is(label_key, rev)], [delete(label_key), delete(self._k("id", str(ident)))], []
        )
        if answer.get("succeeded") and ident not in self._refs:
            self._forget(key, ident)
            return True
        return False

    async def _gc(self) -> int:
        answer = await self._etcd(self._client.range(self._k("label", ""), prefix=True))
        freed = 0
        for key_path, _value, _rev in kv_pairs(answer):
            key = key_path[len(self._k("label", "")) :]
            if await self._etcd(self._collect(key)):
                freed += 1
        return freed

    async def _lookup(self, key: str) -> int | None:
        if key in self._by_key:
            return self._by_key[key]
        if not self.online:
            return None
        try:
            hit = kv_pairs(await self._etcd(self._client.range(self._k("label", key))))
        except KvstoreUnavailable:
            return None
        if not hit:
            return None
        self._learn(key, int(hit[0][1]))
        return int(hit[0][1])

    async def _get(self, ident: int) -> str | None:
        if ident in self._by_id:
            return self._by_id[ident]
        if not self.online:
            return None
        try:
            hit = kv_pairs(await self._etcd(self._client.range(self._k("id", str(ident)))))
        except KvstoreUnavailable:
            return None
        if not hit:
            return None
        self._learn(hit[0][1], ident)
        return hit[0][1]

    # -- the node's other kvstore state -------------------------------------------

    def session(self, work: Callable[[EtcdClient, int], Awaitable[_T]]) -> _T:
        """Run ``work(client, lease)`` with this node's etcd connection and lease.

        For the rest of the node's cluster state (its ipcache entries and node
        record, `flagella.agent.kvstore`): what it puts on ``lease`` vanishes with
        the node. Raises `KvstoreUnavailable` while offline; an unreachable etcd
        during ``work`` marks the node offline (the keepalive task reconnects).
        """

        async def run() -> _T:
            if not self.online or not self.lease:
                raise KvstoreUnavailable("etcd unreachable: this node is offline")
            return await self._etcd(work(self._client, self.lease))

        return self._call(run())

    # -- the Backend protocol -----------------------------------------------------

    def lookup(self, key: str) -> int | None:
        hit = self._by_key.get(key)
        return hit if hit is not None else self._call(self._lookup(key))

    def get(self, ident: int) -> str | None:
        hit = self._by_id.get(ident)
        return hit if hit is not None else self._call(self._get(ident))

    def refresh(self, ident: int) -> str | None:
        """The label key of ``ident`` as etcd has it now (the cache follows); the cached
        one while offline. An id this node holds cannot have changed."""
        if ident in self._refs or not self.online:
            return self._by_id.get(ident)

        async def run() -> str | None:
            try:
                hit = kv_pairs(await self._etcd(self._client.range(self._k("id", str(ident)))))
            except KvstoreUnavailable:
                return self._by_id.get(ident)
            old = self._by_id.get(ident)
            if not hit:
                if old is not None and ident not in self._refs:
                    self._forget(old, ident)
                return None
            if old is not None and old != hit[0][1]:
                self._forget(old, ident)
            self._learn(hit[0][1], ident)
            return hit[0][1]

        return self._call(run())

    def acquire(self, key: str, lowest_free_from: int) -> int:
        return self._call(self._acquire(key, lowest_free_from))

    def acquire_many(self, keys: Sequence[str], lowest_free_from: int = MIN_ALLOCATED_ID) -> list[int]:
        """`acquire` each key, results in order: pipelined, new ones batched.

        Label sets nobody has are created ``BATCH`` at a time in one txn each
        (all or nothing), up to ``connections`` txns in flight; a batch that
        collides with another node is retried without the label sets found to
        exist, and what is left after a few tries goes one txn per key.
        """

        async def run() -> list[int]:
            fresh = [k for k in dict.fromkeys(keys) if k not in self._by_key]
            done: set[str] = set()

            slots = asyncio.Semaphore(self._connections)

            async def batch(chunk: list[str]) -> None:
                async with slots:  # candidates are picked when the txn can go out at once
                    for _attempt in range(4):
                        todo = [k for k in chunk if k not in self._by_key]
                        if not todo or await self._create_batch(todo, lowest_free_from):
                            done.update(todo)
                            return

            await asyncio.gather(*(batch(fresh[i : i + BATCH]) for i in range(0, len(fresh), BATCH)))

            async def held(key: str) -> int:
                return self._by_key[key]

            steps: list[Awaitable[int]] = []
            for key in keys:
                if key in done:
                    done.discard(key)  # its first occurrence: the batch took the reference
                    steps.append(held(key))
                else:
                    steps.append(self._acquire(key, lowest_free_from))
            return list(await asyncio.gather(*steps))

        return self._call(run())

    async def _create_batch(self, keys: list[str], lowest: int) -> bool:
        """Create identities for ``keys`` (unknown here) in one txn; False if any collided."""
        if not self.online:
            raise KvstoreUnavailable(f"etcd unreachable: cannot allocate identities for {keys[0]!r}, ...")
        picks: list[tuple[str, int]] = []
        for key in keys:
            ident = self._candidate(lowest, 0)
            self._pending.add(ident)
            picks.append((key, ident))
        compare: list[dict[str, object]] = []
        success: list[dict[str, object]] = []
        failure: list[dict[str, object]] = []
        for key, ident in picks:
            label_key, id_key = self._k("label", key), self._k("id", str(ident))
            compare += [absent(label_key), absent(id_key)]
            success += [put(id_key, key), put(label_key, str(ident)), put(self._ref(key), str(ident), self.lease)]
            failure += [get(label_key), get(id_key)]
        try:
            answer = await self._etcd(self._client.txn(compare, success, failure))
        finally:
            self._pending.difference_update(ident for _key, ident in picks)
        if answer.get("succeeded"):
            for key, ident in picks:
                self._learn(key, ident)
                self._refs[ident] = self._refs.get(ident, 0) + 1
                self._unreleased.pop(ident, None)
            self._contended = max(0, self._contended - len(picks))
            return True
        found = responses(answer)
        for i, (key, ident) in enumerate(picks):
            by_label, by_id = found[2 * i], found[2 * i + 1]
            for _k, value, _rev in kv_pairs(by_label):
                self._learn(key, int(value))
            for _k, value, _rev in kv_pairs(by_id):
                self._learn(value, ident)
                if not by_label.get("kvs"):
                    self._collided()
        return False

    def release(self, ident: int) -> int:
        return self._call(self._release(ident))

    def gc(self) -> int:
        """Free every identity no node references (e.g. after agents died). Returns how many."""
        return self._call(self._gc())

    def items(self) -> Iterator[tuple[int, str, int]]:
        """Every identity this node knows (cluster-wide), with this node's reference count."""
        for ident, key in sorted(self._by_id.items()):
            yield ident, key, self._refs.get(ident, 0)

    def references(self) -> dict[int, int]:
        return dict(self._refs)

    def replace_all(self, rows: dict[int, tuple[str, int]]) -> None:
        """This node's references become exactly ``rows`` (the holders after a restart)."""

        async def run() -> None:
            for ident in list(self._refs):
                if ident not in rows:
                    self._refs[ident] = 1
                    await self._release(ident)
            for ident, (key, refs) in rows.items():
                self._learn(key, ident)
                self._refs[ident] = refs
                if self.online:
                    new = await self._etcd(self._restore(key, ident))
                    if new != ident:
                        self.reassigned[key] = (ident, new)
                        self._refs[new] = self._refs.pop(ident)

        self._call(run())


__all__ = ["EtcdBackend", "KvstoreError", "KvstoreUnavailable"]
