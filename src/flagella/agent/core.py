"""The agent's state and operations, independent of how requests arrive.

`AgentCore` composes the policy engine, the identity allocator, the
endpoint store and a `Datapath`. Every operation is synchronous and runs
under the server's single lock, so operations never interleave; each one
ends with the kernel enforcing its result (regeneration writes the maps
before the call returns).

Crash safety: an endpoint record is saved before its kernel objects are
created and deleted after they are removed; `restore` finishes or undoes
whatever a crash left: pods without a ready record are removed, map
entries nobody wants are deleted by the first sync.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from flagella.agent.settings import AgentSettings
from flagella.datapath.desired import PolicyKey, PolicyValue, diff, policy_entries
from flagella.datapath.port import Datapath, EndpointRow, IPNetwork, pod_netns_name
from flagella.endpoint import Endpoint, EndpointStore, State
from flagella.errors import DatapathError, FieldError, InputError, PolicyValidationError
from flagella.identity import Allocator, SQLiteBackend
from flagella.identity._allocator import Backend
from flagella.ipcache import desired_ipcache
from flagella.policy.api import Policy, parse_policy
from flagella.policy.engine import PolicyEngine
from flagella.policy.labels import LabelFilter, LabelSet, check_pod_labels, parse_label
from flagella.policy.resolver import EndpointInfo
from flagella.policy.trace import (
    RESERVED_IDENTITIES,
    TraceQuery,
    Tracer,
    cidr_identity_labels,
    reserved_identity_labels,
    rule_prefixes,
)

log = structlog.get_logger("flagella.agent")

ENFORCE_INGRESS = 0x1
ENFORCE_EGRESS = 0x2
HOST_ID = RESERVED_IDENTITIES["host"]
NAME_RE_MAX = 63


@dataclass
class Stats:
    regenerations: Tally[str] = field(default_factory=Tally)
    import_errors: int = 0
    repairs: Tally[str] = field(default_factory=Tally)
    attach_repairs: Tally[str] = field(default_factory=Tally)  # by program


def _check_name(kind: str, name: str) -> None:
    import re

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?", name or ""):
        raise InputError(f"{kind} {name!r}: must be a DNS label (lowercase letters, digits, '-', '.')")


class AgentCore:
    def __init__(
        self,
        settings: AgentSettings,
        datapath: Datapath,
        identity_backend: Backend | None = None,
    ) -> None:
        self.settings = settings
        self.dp = datapath
        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)  # state names every pod and policy: root's alone
        self.store = EndpointStore(self.state_dir / "endpoints")
        if identity_backend is None:
            # SQLite gives its -wal and -shm files the database file's mode.
            db = self.state_dir / "identities.db"
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
            for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                if path.exists():  # a state dir from an older agent: 0644
                    path.chmod(0o600)
        backend = identity_backend or SQLiteBackend(self.state_dir / "identities.db")
        self.allocator = Allocator(backend)
        self.label_filter = (
            LabelFilter.from_strings(settings.label_prefixes) if settings.label_prefixes else LabelFilter()
        )
        self.engine = PolicyEngine(settings.policy)
        self.endpoints: dict[int, Endpoint] = {}
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.cidr_identities: dict[IPNetwork, int] = {}
        self.written: dict[int, dict[PolicyKey, PolicyValue]] = {}
        self.stats = Stats()
        self.host_ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for ident, labels in reserved_identity_labels().items():
            self.engine.set_identity(ident, labels)

    # -- persistence -----------------------------------------------------------

    def _write_json(self, name: str, obj: Any) -> None:
        path = self.state_dir / name
        tmp = path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(obj, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _read_json(self, name: str, default: Any) -> Any:
        try:
            return json.loads((self.state_dir / name).read_text())
        except FileNotFoundError:
            return default

    def _save_policies(self) -> None:
        self._write_json(
            "policies.json",
            {"revision": self.engine.revision, "documents": [p.source for p in self.engine.policies.values()]},
        )

    def _save_namespaces(self) -> None:
        self._write_json("namespaces.json", self.namespace_labels)

    # -- start / restore ---------------------------------------------------------

    def restore(self) -> dict[str, int]:
        """Rebuild in-memory state from the state dir and reconcile the kernel."""
        self.dp.start()
        self.host_ips = self.dp.host_addresses()
        self.namespace_labels = self._read_json("namespaces.json", {})
        saved = self._read_json("policies.json", {"revision": 1, "documents": []})
        policies = [parse_policy(doc) for doc in saved["documents"]]
        self._sync_cidr_identities(policies)
        self.engine.upsert_policies(policies)
        self.engine.revision = max(self.engine.revision, int(saved.get("revision", 1)))
        report = {"restored": 0, "removed": 0}
        records = {ep.id: ep for ep in self.store.load_all()}
        pods = {p.netns: p for p in self.dp.list_pods()}
        for ep in records.values():
            pod = pods.get(ep.netns)
            if ep.state != State.READY or pod is None or pod.ifindex != ep.ifindex:
                # A crash in the middle of create or delete: undo it completely.
                self._teardown(ep)
                report["removed"] += 1
                continue
            self.endpoints[ep.id] = ep
            ep.state = State.RESTORING
            report["restored"] += 1
        # Records from an older agent may carry labels the agent now derives itself (see
        # policy.labels): their endpoints share one identity number per label set again.
        canonical: dict[LabelSet, int] = {}
        for ep in self.endpoints.values():
            ep.identity = canonical.setdefault(self._security_labels(ep), ep.identity)
        # Pods without any record are not ours (records are written before pods are
        # created and deleted after they are removed): another agent's, left alone.
        # Identities: references become exactly what restored endpoints and policy
        # CIDRs hold (a crash can leave a count one too high or too low).
        holders = [(ep.identity, self._security_labels(ep)) for ep in self.endpoints.values()]
        holders += [(ident, cidr_identity_labels(net)) for net, ident in self.cidr_identities.items()]
        report.update(self.allocator.reconcile_holders(holders))
        for ep in self.endpoints.values():
            self.engine.upsert_endpoint(self._info(ep))
        self._sync_identities()
        for ep in self.endpoints.values():
            ep.set_state(State.REGENERATING)
            self.dp.attach(ep.ifindex)
        self.regenerate(self.endpoints.keys())
        self.sync_all(count=False)
        log.info("agent-restored", **report)
        return report

    def _sync_identities(self) -> None:
        for ep in self.endpoints.values():
            labels = self.allocator.labels(ep.identity)
            if labels is not None:
                self.engine.set_identity(ep.identity, labels)

    # -- endpoints ----------------------------------------------------------------

    def _next_endpoint_id(self) -> int:
        """Ids are never reused while the state dir lives: the next is above every id handed
        out before (recorded in ``endpoint_ids.json``), so a new endpoint cannot inherit kernel
        state keyed by an old one's id (conntrack, fragments, policy counters)."""
        used = set(self.endpoints) | {ep.id for ep in self.store.load_all()}
        last = int(self._read_json("endpoint_ids.json", {}).get("last", 0))
        n = max([last, *used]) + 1
        self._write_json("endpoint_ids.json", {"last": n})
        return n

    def _security_labels(self, ep: Endpoint) -> LabelSet:
        return self.label_filter.filter(ep.identity_labels())

    def _info(self, ep: Endpoint) -> EndpointInfo:
        return EndpointInfo(
            id=ep.id,
            identity=ep.identity,
            labels=self._security_labels(ep),
            named_ports={k: frozenset(v) for k, v in ep.named_ports.items()},
            addresses=ep.addresses(),
        )

    def find(self, ref: str | int) -> Endpoint:
        for ep in self.endpoints.values():
            if str(ep.id) == str(ref) or ep.name == ref or f"{ep.namespace}/{ep.name}" == ref:
                return ep
        raise InputError(f"endpoint {ref!r} not found")

    def create_endpoint(
        self,
        name: str,
        namespace: str = "default",
        labels: Mapping[str, str] | None = None,
        namespace_labels: Mapping[str, str] | None = None,
        service_account: str | None = None,
        ipv4: str | None = None,
        ipv6: str | None = None,
        named_ports: Mapping[str, Iterable[tuple[int, int]]] | None = None,
    ) -> Endpoint:
        _check_name("endpoint name", name)
        _check_name("namespace", namespace)
        if service_account is not None:
            _check_name("--service-account", service_account)
        for ep in self.endpoints.values():
            if ep.name == name and ep.namespace == namespace:
                raise InputError(f"endpoint {namespace}/{name} already exists")
        check_pod_labels(labels or {}, "--labels")
        check_pod_labels(namespace_labels or {}, "--namespace-labels")
        v4, v6 = self._addresses(ipv4, ipv6)
        if namespace_labels:  # the same change as `namespace labels --set`: members follow
            self.set_namespace_labels(namespace, namespace_labels, ())
        ep = Endpoint(
            id=self._next_endpoint_id(),
            name=name,
            namespace=namespace,
            labels=dict(labels or {}),
            namespace_labels=dict(self.namespace_labels.get(namespace, {})),
            service_account=service_account,
            ipv4=v4,
            ipv6=v6,
            named_ports={k: [tuple(p) for p in v] for k, v in (named_ports or {}).items()},  # type: ignore[misc]
        )
        ep.netns = pod_netns_name(namespace, name)
        self.dp.check_pod_name(ep.netns)  # before any record: a pod not ours is never touched
        self.store.save(ep)  # intent first: a crash from here on is undone by restore
        ep.set_state(State.WAITING_FOR_IDENTITY)
        ep.identity = self.allocator.allocate(self._security_labels(ep))
        self.store.save(ep)
        try:
            pod = self.dp.ensure_pod(ep.netns, v4, v6)
            ep.host_ifname, ep.ifindex = pod.host_ifname, pod.ifindex
            ep.set_state(State.REGENERATING)
            self.store.save(ep)
            self.endpoints[ep.id] = ep
            affected = self.engine.upsert_endpoint(self._info(ep))
            self._ipcache_endpoint(ep)
            self.regenerate(affected | {ep.id})
            self.dp.attach(ep.ifindex)
        except BaseException:
            self.endpoints.pop(ep.id, None)
            self._teardown(ep)
            raise
        log.info("endpoint-created", endpoint=ep.id, name=name, namespace=namespace, identity=ep.identity)
        return ep

    def _addresses(
        self, ipv4: str | None, ipv6: str | None
    ) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address | None]:
        net4 = ipaddress.IPv4Network(self.settings.network.ipv4_cidr)
        net6 = ipaddress.IPv6Network(self.settings.network.ipv6_cidr) if self.settings.network.ipv6_cidr else None
        used = {a for ep in self.endpoints.values() for a in ep.addresses()}
        v4 = _pick(net4, ipv4, used, "--ipv4")
        v6 = _pick(net6, ipv6, used, "--ipv6") if net6 is not None else None
        return v4, v6  # type: ignore[return-value]

    def delete_endpoint(self, ref: str | int) -> Endpoint:
        ep = self.find(ref)
        ep.set_state(State.DISCONNECTING)
        self.store.save(ep)
        self.endpoints.pop(ep.id, None)
        affected = self.engine.remove_endpoint(ep.id)
        self._teardown(ep)
        self.regenerate(affected)
        log.info("endpoint-deleted", endpoint=ep.id, name=ep.name)
        return ep

    def _teardown(self, ep: Endpoint) -> None:
        """Remove every kernel object and record of ``ep``; safe to repeat."""
        if ep.ifindex:
            self.dp.detach(ep.ifindex)
            self.dp.endpoints.pop(ep.ifindex, None)
        for key in [k for k in self.dp.policy if k.ep_id == ep.id]:
            self.dp.policy.pop(key, None)
        self.dp.bump_generation()  # after every map write: cached verdicts are checked again
        self.written.pop(ep.id, None)
        # Conntrack of the endpoint, and of its addresses in other endpoints' entries:
        # a pod re-created with the same id or address must not inherit old flows.
        addrs = ep.addresses()
        stale = [
            r for r in self.dp.ct_entries()
            if r.ep_id == ep.id or r.saddr in addrs or r.daddr in addrs
        ]
        if stale:
            self.dp.ct_delete(stale)
        self.dp.frag_forget(ep.id, addrs)
        self.dp.remove_pod(ep.netns)
        if ep.identity and ep.state != State.INIT:
            self.allocator.release(ep.identity)
        self.store.delete(ep.id)
        if ep.state != State.DISCONNECTED:
            ep.state = State.DISCONNECTED
        # The address may be named by a policy CIDR: fall back to what the rest wants.
        self._write_ipcache(ipaddress.ip_network(a) for a in ep.addresses())

    def set_endpoint_labels(self, ref: str | int, set_labels: Mapping[str, str], unset: Iterable[str]) -> Endpoint:
        ep = self.find(ref)
        check_pod_labels(set_labels, "--set")
        labels = dict(ep.labels)
        for key in unset:
            labels.pop(key, None)
        labels.update(set_labels)
        self._relabel([ep], lambda e: setattr(e, "labels", labels))
        return ep

    def set_namespace_labels(self, namespace: str, set_labels: Mapping[str, str], unset: Iterable[str]) -> dict[str, str]:
        _check_name("namespace", namespace)
        check_pod_labels(set_labels, "--set")
        labels = dict(self.namespace_labels.get(namespace, {}))
        for key in unset:
            labels.pop(key, None)
        labels.update(set_labels)
        self.namespace_labels[namespace] = labels
        self._save_namespaces()
        members = [ep for ep in self.endpoints.values() if ep.namespace == namespace]
        self._relabel(members, lambda e: setattr(e, "namespace_labels", dict(labels)))
        return labels

    def _relabel(self, eps: list[Endpoint], change: Any) -> None:
        affected: set[int] = set()
        for ep in eps:
            change(ep)
            new = self.allocator.allocate(self._security_labels(ep))
            old = ep.identity
            ep.identity = new
            if ep.state == State.READY:
                ep.set_state(State.WAITING_FOR_IDENTITY)
            self.store.save(ep)
            affected |= self.engine.upsert_endpoint(self._info(ep))
            self._ipcache_endpoint(ep)
            if old != new:
                self.allocator.release(old)
        self.regenerate(affected)

    # -- policy --------------------------------------------------------------------

    def import_policies(self, documents: list[Any], sources: list[str] | None = None) -> int:
        errors: list[FieldError] = []
        policies: list[Policy] = []
        for i, doc in enumerate(documents):
            label = (sources or [])[i] if sources and i < len(sources) else f"document #{i + 1}"
            try:
                policies.append(parse_policy(doc, label))
            except PolicyValidationError as exc:
                errors.extend(exc.errors)
        if errors:
            self.stats.import_errors += 1
            raise PolicyValidationError(errors)
        all_after = {**self.engine.policies, **{p.key: p for p in policies}}
        self._sync_cidr_identities(all_after.values())
        revision, affected = self.engine.upsert_policies(policies)
        self._save_policies()
        self.regenerate(affected, revision)
        self._gc_cidr_identities()
        log.info("policy-imported", policies=len(policies), revision=revision, endpoints=len(affected))
        return revision

    def delete_policies(self, names: Iterable[str], namespace: str | None = None, everything: bool = False) -> int:
        names = set(names)
        keys = [
            k for k in self.engine.policies
            if everything or (k[2] in names and (namespace is None or k[1] == namespace))
        ]
        if not keys and not everything:
            raise InputError(f"no policy named {', '.join(sorted(names))}")
        revision, affected = self.engine.delete_policies(keys)
        self._save_policies()
        self.regenerate(affected, revision)
        self._gc_cidr_identities()
        return revision

    def _sync_cidr_identities(self, policies: Iterable[Policy]) -> None:
        added = []
        for net in rule_prefixes(policies):
            if net not in self.cidr_identities:
                labels = cidr_identity_labels(net)
                ident = self.allocator.allocate(labels)
                self.cidr_identities[net] = ident
                self.engine.set_identity(ident, labels)
                added.append(net)
        self._write_ipcache(added)

    def _gc_cidr_identities(self) -> None:
        wanted = rule_prefixes(self.engine.policies.values())
        gone = [n for n in self.cidr_identities if n not in wanted]
        for net in gone:
            ident = self.cidr_identities.pop(net)
            self.allocator.release(ident)
            affected = self.engine.remove_identity(ident)
            self.regenerate(affected)
        self._write_ipcache(gone)

    def _write_ipcache(self, prefixes: Iterable[IPNetwork]) -> None:
        """Make these ipcache entries what the full desired ipcache says (an endpoint's
        own address wins over a policy CIDR that names it exactly)."""
        prefixes = list(prefixes)
        if not prefixes:
            return
        desired = self.desired_ipcache()
        try:
            for net in prefixes:
                if net in desired:
                    self.dp.ipcache[net] = desired[net]
                else:
                    self.dp.ipcache.pop(net, None)
        finally:
            self.dp.bump_generation()

    # -- regeneration ----------------------------------------------------------------

    def _ipcache_endpoint(self, ep: Endpoint) -> None:
        try:
            for addr in ep.addresses():
                self.dp.ipcache[ipaddress.ip_network(addr)] = ep.identity
        finally:
            self.dp.bump_generation()

    def desired_policy(self, ep: Endpoint) -> tuple[dict[PolicyKey, PolicyValue], EndpointRow]:
        pol = self.engine.policy(ep.id)
        port = self.settings.policy.proxy_port
        ingress, imask = policy_entries(ep.id, pol.ingress, False, port)
        egress, emask = policy_entries(ep.id, pol.egress, True, port)
        flags = (ENFORCE_INGRESS if pol.ingress.enforced else 0) | (
            ENFORCE_EGRESS if pol.egress.enforced else 0
        )
        row = EndpointRow(ep.id, ep.identity, flags, imask, emask, ep.ipv4, ep.ipv6)
        return {**ingress, **egress}, row

    def regenerate(self, ep_ids: Iterable[int], revision: int | None = None) -> None:
        """Write the resolved policy of ``ep_ids``; every endpoint then enforces ``revision``.

        Endpoints not in ``ep_ids`` were not affected by the change, so they
        already enforce the new revision as they are.
        """
        revision = revision or self.engine.revision
        ep_ids = set(ep_ids)
        for ep in self.endpoints.values():
            if ep.id not in ep_ids:
                ep.policy_revision = max(ep.policy_revision, revision)
        for ep_id in sorted(ep_ids):
            ep = self.endpoints.get(ep_id)
            if ep is None or ep_id not in self.engine.resolved:
                continue
            if ep.state in (State.READY, State.WAITING_FOR_IDENTITY, State.RESTORING):
                ep.set_state(State.REGENERATING)
            try:
                self._write_endpoint(ep)
            except Exception:
                self.stats.regenerations["fail"] += 1
                raise
            self.stats.regenerations["success"] += 1
            ep.policy_revision = revision
            pol = self.engine.policy(ep_id)
            ep.enforcing_ingress, ep.enforcing_egress = pol.ingress.enforced, pol.egress.enforced
            if ep.state == State.REGENERATING:
                ep.set_state(State.READY)
            self.store.save(ep)

    def _write_endpoint(self, ep: Endpoint) -> None:
        desired, row = self.desired_policy(ep)
        actual = self.written.get(ep.id, {})
        upserts, deletes = diff(actual, desired)
        try:
            self.dp.policy.update(upserts)
            old_row = self.dp.endpoints.get(ep.ifindex)
            if old_row is not None and deletes:
                # Keep probing the old wildcard widths until their entries are gone.
                widened = EndpointRow(
                    row.ep_id, row.identity, row.flags,
                    row.ingress_wild_mask | old_row.ingress_wild_mask,
                    row.egress_wild_mask | old_row.egress_wild_mask, row.ipv4, row.ipv6,
                )
                self.dp.endpoints[ep.ifindex] = widened
            else:
                self.dp.endpoints[ep.ifindex] = row
            for k in deletes:
                self.dp.policy.pop(k, None)
            self.dp.endpoints[ep.ifindex] = row
        finally:
            # Even after a partial write: verdicts cached in conntrack are checked again.
            self.dp.bump_generation()
        self.written[ep.id] = desired

    # -- controllers -------------------------------------------------------------------

    def desired_ipcache(self) -> dict[IPNetwork, int]:
        return desired_ipcache(
            self.cidr_identities,
            self.host_ips,
            ((addr, ep.identity) for ep in self.endpoints.values() for addr in ep.addresses()),
        )

    def sync_all(self, count: bool = True) -> int:
        """Make every map equal to the desired state; return the number of repairs."""
        repairs = 0
        desired_policy: dict[PolicyKey, PolicyValue] = {}
        desired_rows: dict[int, EndpointRow] = {}
        for ep in self.endpoints.values():
            if ep.id not in self.engine.resolved:
                continue
            entries, row = self.desired_policy(ep)
            desired_policy.update(entries)
            desired_rows[ep.ifindex] = row
            self.written[ep.id] = entries
        writing = False
        try:
            for name, actual_map, desired in (
                ("policy", self.dp.policy, desired_policy),
                ("endpoints", self.dp.endpoints, desired_rows),
                ("ipcache", self.dp.ipcache, self.desired_ipcache()),
            ):
                actual = dict(actual_map.items())
                upserts, deletes = diff(actual, desired)  # type: ignore[arg-type]
                writing = writing or bool(upserts or deletes)
                for k, v in upserts.items():
                    actual_map[k] = v  # type: ignore[index]
                for k in deletes:
                    actual_map.pop(k, None)  # type: ignore[call-overload]
                n = len(upserts) + len(deletes)
                if n and count:
                    self.stats.repairs[name] += n
                    log.warning("map-drift-repaired", map=name, upserts=len(upserts), deletes=len(deletes))
                repairs += n
        finally:
            if writing:  # a repair can change verdicts: cached ones are checked again
                self.dp.bump_generation()
        return repairs + self._sync_attachments(count)

    def _sync_attachments(self, count: bool) -> int:
        """Reattach the programs of every endpoint where they no longer run (a filter
        deleted with tc, a link detached with bpftool); return how many were."""
        repaired, failed = 0, []
        for ep in self.endpoints.values():
            try:
                fixed = self.dp.attach(ep.ifindex)
            except DatapathError as exc:
                failed.append(f"endpoint {ep.id} (ifindex {ep.ifindex}): {exc}")
                continue
            if fixed and count:
                self.stats.attach_repairs.update(fixed)
                log.warning("attachment-repaired", endpoint=ep.id, ifindex=ep.ifindex, programs=fixed)
            repaired += len(fixed)
        if failed:
            raise DatapathError("reattaching programs failed: " + "; ".join(failed))
        return repaired

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

    # -- queries ---------------------------------------------------------------------------

    def identities(self) -> dict[int, dict[str, Any]]:
        refs = self.allocator.references()
        out = {}
        for ident, labels in sorted(self.allocator.all().items()):
            out[ident] = {"id": ident, "labels": sorted(str(x) for x in labels), "references": refs.get(ident, 0)}
        return out

    def live_identities(self) -> dict[LabelSet, int]:
        """Allocated label sets and their numbers: a trace keeps them, so a traced
        endpoint shows its real identity."""
        return {labels: ident for ident, labels in self.allocator.all().items()}

    def trace(self, queries: list[TraceQuery]) -> list[dict[str, Any]]:
        tracer = Tracer(
            self.engine.policies.values(), self.settings.policy, self.label_filter, self.live_identities()
        )
        return [tracer.trace(q).to_json() for q in queries]

    def status(self) -> dict[str, Any]:
        return {
            "endpoints": len(self.endpoints),
            "policies": len(self.engine.policies),
            "revision": self.engine.revision,
            "identities": len(self.allocator.all()),
            "repairs": dict(self.stats.repairs),
            "attach_repairs": dict(self.stats.attach_repairs),
            "regenerations": dict(self.stats.regenerations),
        }


def _pick(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
    requested: str | None,
    used: set[Any],
    flag: str,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if requested:
        try:
            addr = ipaddress.ip_address(requested)
        except ValueError:
            raise InputError(f"{flag}: {requested!r} is not an IP address") from None
        if addr.version != net.version:
            raise InputError(f"{flag}: {addr} is not an IPv{net.version} address")
        if addr not in net:
            raise InputError(f"{flag}: {addr} is not in the node's pod CIDR {net}")
        if addr in used:
            raise InputError(f"{flag}: {addr} is already in use")
        return addr
    skip = 1  # .1 / ::1 stay free (gateways by convention)
    for i, addr in enumerate(net.hosts()):
        if i < skip:
            continue
        if addr not in used:
            return addr
    raise InputError(f"no free address left in {net}")


def parse_kv(items: Iterable[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        for part in str(item).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise InputError(f"{flag}: {part!r} is not key=value")
            label = parse_label(part)
            out[label.key] = label.value
    return out


_ = time  # monotonic clocks are read through the datapath
