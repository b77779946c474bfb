"""Kernel realization: the datapath as an enforcer of the regeneration pipeline.

Theory of operation
-------------------
:class:`DatapathEnforcer` owns what the maps of a :class:`~flagella.datapath.port.Datapath`
(the kernel, or its in-memory twin) should hold, and writes only differences:

* **policy and endpoint rows**, per endpoint, by :meth:`apply` (the pipeline's
  ``Enforcer.apply``): the resolved policy becomes kernel entries
  (:func:`~flagella.datapath.desired.policy_entries`), diffed against what this
  enforcer last wrote for the endpoint. While stale wildcard entries are being
  deleted the row keeps probing the old widths, so no packet sees a half-written
  policy. The kernel write returns before ``apply`` does, so the completion is
  complete when returned (or the call raises: a failed regeneration);
* **incrementally**: the pipeline hands over MapState copies (O(1), copy on
  write), and this enforcer keeps the copies it realized last. The MapState
  journal (:meth:`~flagella.policy.mapstate.MapState.changed_since`) names the
  keys changed since, or, for states with no common journal (a fresh resolution
  after a policy change), :func:`~flagella.policy.mapstate.changed_keys` compares
  them chunk by chunk. Only the peer identities of those keys are computed again
  (kernel entries of two identities never merge), and the row's wildcard masks
  come from a count of entries per width. New and changed entries go in one
  batched update, stale ones in one batched delete, then the row, then one
  generation bump. The first apply of an endpoint, and the one after a failed
  write, compute every entry (the retry also deletes what the failed one meant
  to);
* **the ipcache**, by :meth:`set_ipcache`: the agent passes the whole desired
  ipcache and the prefixes that may have changed;
* **the verdict-cache generation**, bumped after every write, inside the same
  call (even after a partial write): cached verdicts are then checked again;
* **drift repair** (:meth:`sync`): every map is made equal to what this
  enforcer wants, counting repairs per map;
* **conntrack**: expired entries are collected (:meth:`ct_gc`), and an
  endpoint's flows are purged when it goes (:meth:`purge_flows`).

Concurrency: the pipeline applies different endpoints from different threads.
Each endpoint has a lock of its own, held while its entries are written, and a
version that every write bumps. :meth:`sync` dumps the maps first and then
repairs an endpoint only under its lock and only if its version did not move
since before the dump, so a repair never undoes a regeneration that raced it
(the next sync looks again). No lock is held across two endpoints' writes.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from flagella.datapath.desired import diff, identity_entries, policy_entries, wild_mask
from flagella.datapath.entries import EndpointRow, PolicyKey, PolicyValue
from flagella.datapath.port import Datapath, IPAddress, IPNetwork
from flagella.endpoint.model import Endpoint
from flagella.endpoint.regeneration import Completion
from flagella.policy.mapstate import MapState, changed_keys
from flagella.policy.resolver import EndpointPolicy

__all__ = ["DatapathEnforcer"]

log = structlog.get_logger("flagella.datapath")


@dataclass
class _Realized:
    """What one endpoint's written entries were computed from (touched under its lock)."""

    #: The MapState snapshots of the last apply (never changed afterwards).
    ingress: MapState
    egress: MapState
    #: Written entries per wild-bits width, ingress and egress: the row's masks.
    widths: tuple[Counter[int], Counter[int]]


class DatapathEnforcer:
    name = "datapath"

    def __init__(self, datapath: Datapath, ingress_proxy_port: int, egress_proxy_port: int) -> None:
        self.dp = datapath
        #: The node proxy's listener per direction: the value of a REDIRECT key.
        self.ingress_proxy_port = ingress_proxy_port
        self.egress_proxy_port = egress_proxy_port
        #: ep_id -> the entries last written (what the kernel should hold).
        self.written: dict[int, dict[PolicyKey, PolicyValue]] = {}
        #: ep_id -> (ifindex, row) last written.
        self.rows: dict[int, tuple[int, EndpointRow]] = {}
        self.ipcache: dict[IPNetwork, int] = {}
        #: ep_id -> whether its last apply wrote everything (a pod is attached only then).
        self.complete: dict[int, bool] = {}
        #: ep_id -> the policy the written entries were computed from.
        self._realized: dict[int, _Realized] = {}
        #: ep_id -> entries a failed apply meant to delete (they may still be there).
        self._unsure: dict[int, set[PolicyKey]] = {}
        self.repairs: Counter[str] = Counter()
        self._meta = threading.Lock()  # guards the dicts below, never held across writes
        self._locks: dict[int, threading.Lock] = {}
        self._versions: dict[int, int] = {}
        self._ipcache_lock = threading.Lock()

    def _lock(self, ep_id: int) -> threading.Lock:
        with self._meta:
            return self._locks.setdefault(ep_id, threading.Lock())

    def _bump_version(self, ep_id: int) -> None:
        with self._meta:
            self._versions[ep_id] = self._versions.get(ep_id, 0) + 1

    # -- the enforcer protocol ----------------------------------------------------------

    def desired(self, ep: Endpoint, policy: EndpointPolicy) -> tuple[dict[PolicyKey, PolicyValue], EndpointRow]:
        ingress, imask = policy_entries(ep.id, policy.ingress, False, self.ingress_proxy_port)
        egress, emask = policy_entries(ep.id, policy.egress, True, self.egress_proxy_port)
        row = EndpointRow(
            ep.id, ep.identity, policy.ingress.enforced, policy.egress.enforced,
            imask, emask, ep.ipv4, ep.ipv6,
        )
        return {**ingress, **egress}, row

    def apply(self, endpoint: Endpoint, revision: int, policy: EndpointPolicy) -> Completion:
        ifindex = endpoint.ifindex
        with self._lock(endpoint.id):
            self._bump_version(endpoint.id)
            base = self._realized.pop(endpoint.id, None)
            if base is not None and self.complete.get(endpoint.id):
                written = self.written[endpoint.id]
                upserts, deletes, widths = self._delta(endpoint.id, base, policy, written)
            else:  # the first apply, or the last one failed: compute every entry
                desired, _ = self.desired(endpoint, policy)
                written = self.written.get(endpoint.id, {})
                if base is None:
                    upserts, deletes = diff(written, desired)
                else:  # the last write stopped half-way: write every entry again
                    maybe = written.keys() | self._unsure.pop(endpoint.id, set())
                    upserts, deletes = dict(desired), [k for k in maybe if k not in desired]
                widths = (Counter(k.wild_bits for k in desired if not k.egress),
                          Counter(k.wild_bits for k in desired if k.egress))
                written = desired
            row = EndpointRow(
                endpoint.id, endpoint.identity, policy.ingress.enforced, policy.egress.enforced,
                wild_mask(widths[0]), wild_mask(widths[1]), endpoint.ipv4, endpoint.ipv6,
            )
            # What we want, even if the write below fails half-way: sync repairs to it,
            # and the next apply writes every entry again.
            old = self.rows.get(endpoint.id)
            self.written[endpoint.id] = written
            self.rows[endpoint.id] = (ifindex, row)
            self._realized[endpoint.id] = _Realized(policy.ingress, policy.egress, widths)
            self.complete[endpoint.id] = False
            try:
                if upserts:
                    self.dp.policy.update(upserts)
                if deletes:
                    if old is not None and old[0] == ifindex:
                        # Keep probing the old wildcard widths until their entries are gone.
                        self.dp.endpoints[ifindex] = dataclasses.replace(
                            row,
                            ingress_wild_mask=row.ingress_wild_mask | old[1].ingress_wild_mask,
                            egress_wild_mask=row.egress_wild_mask | old[1].egress_wild_mask,
                        )
                    self.dp.delete_policy_entries(deletes)
                self.dp.endpoints[ifindex] = row
            except BaseException:
                # The deletes may not have happened: the next apply makes sure they do.
                self._unsure.setdefault(endpoint.id, set()).update(deletes)
                raise
            finally:
                self.dp.bump_generation()  # one bump per apply, after a partial write too
            self.complete[endpoint.id] = True
        return Completion.completed()

    def _delta(
        self, ep_id: int, base: _Realized, policy: EndpointPolicy, written: dict[PolicyKey, PolicyValue]
    ) -> tuple[dict[PolicyKey, PolicyValue], list[PolicyKey], tuple[Counter[int], Counter[int]]]:
        """The writes that take the entries of ``base``'s policy to ``policy``'s: only the
        identities whose MapState keys changed are computed again. Updates ``written``
        and the width counts in place (the caller owns them)."""
        upserts: dict[PolicyKey, PolicyValue] = {}
        deletes: list[PolicyKey] = []
        sides = (
            (False, base.ingress, policy.ingress, self.ingress_proxy_port, base.widths[0]),
            (True, base.egress, policy.egress, self.egress_proxy_port, base.widths[1]),
        )
        for egress, before, after, port, widths in sides:
            journaled = after.changed_since(before)
            changed = changed_keys(before, after) if journaled is None else journaled
            for ident in {k.identity for k in changed}:
                old = identity_entries(ep_id, before, ident, egress, port)
                new = identity_entries(ep_id, after, ident, egress, port)
                for k, v in new.items():
                    if k not in old:
                        widths[k.wild_bits] += 1
                    if written.get(k) != v:
                        upserts[k] = written[k] = v
                for k in old:
                    if k not in new:
                        widths[k.wild_bits] -= 1
                        if written.pop(k, None) is not None:
                            deletes.append(k)
        return upserts, deletes, base.widths

    def remove(self, endpoint: Endpoint) -> None:
        with self._lock(endpoint.id):
            self._bump_version(endpoint.id)
            written = self.written.pop(endpoint.id, None)
            self.complete.pop(endpoint.id, None)
            self._realized.pop(endpoint.id, None)
            unsure = self._unsure.pop(endpoint.id, set())
            _, row = self.rows.pop(endpoint.id, (endpoint.ifindex, None))
            try:
                if endpoint.ifindex:
                    self.dp.endpoints.pop(endpoint.ifindex, None)
                keys = [*(written or ()), *unsure]
                # Entries written before a crash are known to nobody: look for them.
                keys += [k for k in self.dp.policy if k.ep_id == endpoint.id]
                self.dp.delete_policy_entries(set(keys))
            finally:
                self.dp.bump_generation()

    # -- ipcache ---------------------------------------------------------------------------

    def set_ipcache(self, desired: Mapping[IPNetwork, int], prefixes: Iterable[IPNetwork]) -> None:
        """``desired`` is the whole ipcache; write the entries of ``prefixes`` to match it."""
        prefixes = list(prefixes)
        with self._ipcache_lock:
            self.ipcache = dict(desired)
            if not prefixes:
                return
            try:
                for net in prefixes:
                    if net in desired:
                        self.dp.ipcache[net] = desired[net]
                    else:
                        self.dp.ipcache.pop(net, None)
            finally:
                self.dp.bump_generation()

    # -- drift repair --------------------------------------------------------------------------

    def sync(self, count: bool = True) -> int:
        """Make every map equal to what this enforcer wants; return the number of repairs."""
        with self._meta:
            versions = dict(self._versions)
        actual_policy = dict(self.dp.policy.items())
        actual_rows = dict(self.dp.endpoints.items())
        by_ep: dict[int, dict[PolicyKey, PolicyValue]] = {}
        for k, v in actual_policy.items():
            by_ep.setdefault(k.ep_id, {})[k] = v
        repaired: Counter[str] = Counter()
        try:
            owners = {ifindex: ep_id for ep_id, (ifindex, _) in list(self.rows.items())}
            ep_ids = set(by_ep) | set(self.written) | {r.ep_id for r in actual_rows.values()}
            for ep_id in sorted(ep_ids):
                with self._lock(ep_id):
                    with self._meta:
                        if self._versions.get(ep_id, 0) != versions.get(ep_id, 0):
                            continue  # regenerated since the dump: the next sync looks again
                    upserts, deletes = diff(by_ep.get(ep_id, {}), self.written.get(ep_id, {}))
                    if upserts:
                        self.dp.policy.update(upserts)
                    if deletes:
                        self.dp.delete_policy_entries(deletes)
                    repaired["policy"] += len(upserts) + len(deletes)
                    want = self.rows.get(ep_id)
                    if want is not None and actual_rows.get(want[0]) != want[1]:
                        self.dp.endpoints[want[0]] = want[1]
                        repaired["endpoints"] += 1
            for ifindex in actual_rows:
                if ifindex not in owners:  # an endpoint that is gone
                    self.dp.endpoints.pop(ifindex, None)
                    repaired["endpoints"] += 1
            with self._ipcache_lock:
                upserts_ip, deletes_ip = diff(dict(self.dp.ipcache.items()), self.ipcache)
                for net, ident in upserts_ip.items():
                    self.dp.ipcache[net] = ident
                for net in deletes_ip:
                    self.dp.ipcache.pop(net, None)
                repaired["ipcache"] += len(upserts_ip) + len(deletes_ip)
        except BaseException:
            self.dp.bump_generation()  # after a partial repair too
            raise
        if +repaired:  # a repair can change verdicts: cached ones are checked again
            self.dp.bump_generation()
        for name, n in repaired.items():
            if n and count:
                self.repairs[name] += n
                log.warning("map-drift-repaired", map=name, entries=n)
        return sum(repaired.values())

    # -- conntrack --------------------------------------------------------------------------------

    def ct_gc(self, tcp: bool = True) -> int:
        """Delete expired conntrack entries (with ``tcp=False``, only non-TCP ones).

        The kernel already treats expired entries as absent; this frees their slots.
        """
        now = self.dp.now_ns()
        expired = [
            row for row in self.dp.ct_entries()
            if row.expires_ns <= now and (tcp or row.proto != 6)
        ]
        return self.dp.ct_delete(expired) if expired else 0

    def purge_flows(self, ep_id: int, addresses: Iterable[IPAddress]) -> int:
        """Delete the endpoint's conntrack and fragment entries, and those of its
        addresses in other endpoints' entries: a pod re-created with the same id or
        address must not inherit old flows."""
        addrs = frozenset(addresses)
        stale = [
            r for r in self.dp.ct_entries()
            if r.ep_id == ep_id or r.saddr in addrs or r.daddr in addrs
        ]
        deleted = self.dp.ct_delete(stale) if stale else 0
        # Fragment state too: a recycled id or address must not pass a stranger's fragments.
        self.dp.frag_forget(ep_id, addrs)
        return deleted
