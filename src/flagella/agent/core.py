"""The agent's state and operations, independent of how requests arrive.

`AgentCore` is orchestration only. It composes the policy engine, the identity
allocator, the endpoint store, pod plumbing (the `Datapath` port) and the
regeneration pipeline (`flagella.endpoint.regeneration`), whose enforcers
realize policy: the kernel datapath (`flagella.datapath.realizer`) first, the
xDS server next. Operations run one at a time under the server's lock; the
kernel writes of a regeneration happen in the pipeline's per-endpoint workers,
outside that lock.

What an operation waits for: creating an endpoint waits for its first
regeneration before its program is attached (a pod never runs unenforced);
endpoint and label changes wait (bounded) for the regenerations they caused;
a policy import returns its revision at once, and ``wait_for_revision`` (``policy
import --wait``) waits until every endpoint realized it with every enforcer.

Pods of a Kubernetes cluster (`flagella.agent.cluster` relays the watchers):
`set_pod_labels` records a pod's labels and service account by namespace/name and
applies them to the endpoint of that pod, at once when it exists, or when it is
created later (by the CNI plugin or the CLI, with the pod's name): the cluster's
labels replace any given at creation. `use_node_pod_cidrs` narrows the address
allocators to this node's PodCIDRs; while a required one (``k8s.require_*``) is
unknown, endpoint creation is refused with an error naming the flag.

Crash safety: an endpoint record is saved before its kernel objects are
created and deleted after they are removed; `restore` finishes or undoes
whatever a crash left: pods whose creation did not finish are removed, map
entries nobody wants are deleted by the first sync.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from flagella.agent.persistence import StateFiles
from flagella.agent.settings import AgentSettings
from flagella.clock import Clock
from flagella.datapath.port import Datapath, IPNetwork, pod_netns_name
from flagella.datapath.realizer import DatapathEnforcer
from flagella.endpoint import Endpoint, EndpointStore, State
from flagella.endpoint.addressing import PodAddressAllocator
from flagella.endpoint.regeneration import Enforcer, Pipeline
from flagella.errors import DatapathError, FieldError, InputError, PolicyValidationError
from flagella.identity import Allocator, SQLiteBackend
from flagella.identity._allocator import Backend, labels_key
from flagella.ipcache import ClusterState, NodeRecord, desired_ipcache
from flagella.istio import sidecar as istio_sidecar
from flagella.policy.api import Policy, parse_policy
from flagella.policy.engine import PolicyEngine
from flagella.policy.identities import cidr_identity_labels, reserved_identity_labels, rule_prefixes
from flagella.policy.labels import LabelFilter, LabelSet, check_pod_labels, parse_label
from flagella.policy.resolver import EndpointInfo, EndpointPolicy
from flagella.policy.trace import TraceQuery, Tracer

log = structlog.get_logger("flagella.agent")



@dataclass
class Stats:
    import_errors: int = 0
    attach_repairs: Tally[str] = field(default_factory=Tally)  # by program


def _check_name(kind: str, name: str) -> None:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?", name or ""):
        raise InputError(f"{kind} {name!r}: must be a DNS label (lowercase letters, digits, '-', '.')")


class AgentCore:
    def __init__(
        self,
        settings: AgentSettings,
        datapath: Datapath,
        identity_backend: Backend | None = None,
        enforcers: Sequence[Enforcer] = (),
        clock: Clock | None = None,
        with_kernel: Sequence[Enforcer] = (),
    ) -> None:
        """``enforcers`` (the xDS server's) complete before the kernel datapath applies:
        a port is redirected only once the proxy ACKed its listener and policy.
        ``with_kernel`` (Istio sidecars) are applied next to the kernel: they never
        hold its policy back, their completions still make the endpoint ready."""
        self.settings = settings
        self.dp = datapath
        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)  # state names every pod and policy: root's alone
        self.files = StateFiles(self.state_dir)
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
        #: Labels and service account of pods the watcher reported (`set_pod_labels`).
        #: What the cluster says of pods: labels, service account, Flagella-aware sidecar.
        self.known_pods: dict[tuple[str, str], tuple[dict[str, str], str | None, bool]] = {}
        self.cidr_identities: dict[IPNetwork, int] = {}
        self.stats = Stats()
        self.host_ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        net = settings.network
        self.ipam4 = PodAddressAllocator(ipaddress.IPv4Network(net.ipv4_cidr))
        self.ipam6 = PodAddressAllocator(ipaddress.IPv6Network(net.ipv6_cidr)) if net.ipv6_cidr else None
        #: Why endpoints cannot be created yet (a required PodCIDR still unknown).
        self.pod_cidr_missing = _missing_pod_cidrs(settings, v4=False, v6=False)
        self.kernel = DatapathEnforcer(datapath, settings.proxy.ingress_port, settings.proxy.egress_port)
        #: Called with the whole desired ipcache after every ipcache write (the node
        #: proxy's peer sets follow identities and addresses through it).
        self.ipcache_listeners: list[Callable[[Mapping[IPNetwork, int]], None]] = []
        self.pipeline = Pipeline(
            [self.kernel, *with_kernel], settings.regeneration, clock, on_change=self._endpoint_changed, first=enforcers
        )
        for ident, labels in reserved_identity_labels().items():
            self.engine.set_identity(ident, labels)
        kv = settings.kvstore
        #: Cluster mode (etcd): the other nodes and their endpoints, see `apply_cluster`.
        self.cluster = ClusterState(kv.node_name, kv.cluster_prefix) if kv.backend == "etcd" else None
        #: Identities of remote endpoints this node has handed to the policy engine.
        self.remote_identities: set[int] = set()
        self._cluster_errors: list[str] = []
        self._node_routes: dict[IPNetwork, Any] | None = None

    def _endpoint_changed(self, ep: Endpoint) -> None:
        if ep.id in self.endpoints:
            self.store.save_later(ep)  # regeneration progress: restore recomputes it

    def close(self) -> None:
        self.pipeline.stop()
        self.store.flush()

    # -- persistence -----------------------------------------------------------

    def _save_policies(self) -> None:
        self.files.save_policies(self.engine.revision, [p.source for p in self.engine.policies.values()])

    # -- start / restore ---------------------------------------------------------

    def restore(self) -> dict[str, int]:
        """Rebuild in-memory state from the state dir and reconcile the kernel."""
        self.pipeline.start()
        self.dp.start()
        self.host_ips = self.dp.host_addresses()
        self.namespace_labels = self.files.load_namespaces()
        revision, documents = self.files.load_policies()
        policies = [parse_policy(doc) for doc in documents]
        self._sync_cidr_identities(policies)
        self.engine.upsert_policies(policies)
        self.engine.revision = max(self.engine.revision, revision)
        report = {"restored": 0, "removed": 0}
        records = {ep.id: ep for ep in self.store.load_all()}
        pods = {p.netns: p for p in self.dp.list_pods()}
        for ep in records.values():
            pod = pods.get(ep.netns)
            if not ep.created or pod is None or pod.ifindex != ep.ifindex or ep.state == State.DISCONNECTING:
                # A crash in the middle of create or delete: undo it completely.
                self._teardown(ep)
                report["removed"] += 1
                continue
            self.endpoints[ep.id] = ep
            self._reserve_addresses(ep)
            ep.state, ep.state_reason = State.RESTORING, ""
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
        self._write_ipcache(())
        self._regenerate_and_wait(self.endpoints.keys())
        for ep in self.endpoints.values():
            if self.kernel.complete.get(ep.id):
                self.dp.attach(ep.ifindex)
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
        n = max([self.files.load_last_endpoint_id(), *used]) + 1
        self.files.save_last_endpoint_id(n)
        return n

    def _security_labels(self, ep: Endpoint) -> LabelSet:
        return self.label_filter.filter(ep.identity_labels())

    def security_labels(self, ep: Endpoint) -> LabelSet:
        return self._security_labels(ep)

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
        istio_sidecar: bool = False,
        container_id: str = "",
        netns_path: str | None = None,
        ifname: str = "",
        mtu: int = 0,
        init_identity: bool = False,
    ) -> Endpoint:
        """Create pod ``namespace/name`` and return once its policy is enforced.

        The agent makes the pod's network namespace, unless ``netns_path`` names one a
        container runtime made (CNI): that one is adopted, with the pod end named
        ``ifname``. ``init_identity``: the pod's labels are not known yet; it runs as
        ``reserved:init`` until `set_pod_labels` (or `set_endpoint_labels`) gives them.
        """
        _check_name("endpoint name", name)
        _check_name("namespace", namespace)
        if self.pod_cidr_missing:
            raise InputError(f"endpoint {namespace}/{name}: {self.pod_cidr_missing}")
        known = self.known_pods.get((namespace, name))
        if known is not None:  # the cluster's word on the pod wins
            labels, service_account, istio_sidecar = known
            init_identity = False
        if service_account is not None:
            _check_name("--service-account", service_account)
        for ep in self.endpoints.values():
            if ep.name == name and ep.namespace == namespace:
                raise InputError(f"endpoint {namespace}/{name} already exists")
        check_pod_labels(labels or {}, "--labels")
        check_pod_labels(namespace_labels or {}, "--namespace-labels")
        v4, v6 = self._addresses(ipv4, ipv6)
        try:
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
                named_ports={k: [(int(p[0]), int(p[1])) for p in v] for k, v in (named_ports or {}).items()},
                istio_sidecar=istio_sidecar,
                container_id=container_id,
                ifname=ifname,
                mtu=mtu,
                init_identity=init_identity,
            )
            ep.netns = pod_netns_name(namespace, name, self.settings.pod_netns_prefix)
            self.dp.check_pod_name(ep.netns)  # before any record: a pod not ours is never touched
        except BaseException:
            self._release_addresses(v4, v6)
            raise
        self.store.save(ep)  # intent first: a crash from here on is undone by restore
        ep.set_state(State.WAITING_FOR_IDENTITY)
        try:
            if netns_path is not None:
                self.dp.adopt_netns(ep.netns, netns_path, ifname or "eth0")
            ep.identity = self.allocator.allocate(self._security_labels(ep))
            self.store.save(ep)
            pod = self.dp.ensure_pod(ep.netns, v4, v6, ifname or "eth0", mtu or None)
            ep.host_ifname, ep.ifindex, ep.mac = pod.host_ifname, pod.ifindex, pod.pod_mac
            self.store.save(ep)
            self.endpoints[ep.id] = ep
            affected = self.engine.upsert_endpoint(self._info(ep))
            self._ipcache_endpoint(ep)
            self._regenerate_and_wait(affected | {ep.id})
            if not self.kernel.complete.get(ep.id):
                raise DatapathError(f"endpoint {ep.id}: its policy was not written: {ep.state_reason}")
            self.dp.attach(ep.ifindex)
            ep.created = True
            self.store.save(ep)
        except BaseException:
            self.endpoints.pop(ep.id, None)
            self._teardown(ep)
            raise
        log.info("endpoint-created", endpoint=ep.id, name=name, namespace=namespace, identity=ep.identity)
        return ep

    def _addresses(
        self, ipv4: str | None, ipv6: str | None
    ) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address | None]:
        req4 = _parse_address(ipv4, 4, "--ipv4")
        req6 = _parse_address(ipv6, 6, "--ipv6")
        if req6 is not None and self.ipam6 is None:
            raise InputError("--ipv6: the node has no IPv6 pod CIDR")
        try:
            v4 = self.ipam4.allocate(req4)
        except InputError as exc:
            raise InputError(f"--ipv4: {exc}") from None
        try:
            v6 = self.ipam6.allocate(req6) if self.ipam6 is not None else None
        except InputError as exc:
            self.ipam4.release(v4)
            raise InputError(f"--ipv6: {exc}") from None
        return v4, v6

    def _reserve_addresses(self, ep: Endpoint) -> None:
        if ep.ipv4 is not None and ep.ipv4 not in self.ipam4.in_use:
            self.ipam4.allocate(ep.ipv4)
        if ep.ipv6 is not None and self.ipam6 is not None and ep.ipv6 not in self.ipam6.in_use:
            self.ipam6.allocate(ep.ipv6)

    def _release_addresses(
        self, v4: ipaddress.IPv4Address | None, v6: ipaddress.IPv6Address | None
    ) -> None:
        if v4 is not None:
            self.ipam4.release(v4)
        if v6 is not None and self.ipam6 is not None:
            self.ipam6.release(v6)

    def delete_endpoint(self, ref: str | int) -> Endpoint:
        ep = self.find(ref)
        self.pipeline.halt(ep)  # no worker touches it from here on
        ep.set_state(State.DISCONNECTING)
        self.store.save(ep)
        self.endpoints.pop(ep.id, None)
        affected = self.engine.remove_endpoint(ep.id)
        affected |= self._teardown(ep)
        self._regenerate_and_wait(affected - {ep.id})
        log.info("endpoint-deleted", endpoint=ep.id, name=ep.name)
        return ep

    def _teardown(self, ep: Endpoint) -> set[int]:
        """Remove every kernel object and record of ``ep``; safe to repeat. Returns the
        endpoints whose policy changes because ``ep``'s identity is gone."""
        if ep.ifindex:
            self.dp.detach(ep.ifindex)
        self.pipeline.remove(ep)  # every enforcer forgets it (the kernel: row and policy)
        self.kernel.purge_flows(ep.id, ep.addresses())  # conntrack and fragments
        self.dp.remove_pod(ep.netns)
        affected: set[int] = set()
        if ep.identity and ep.state != State.INIT:
            affected = self._release_identity(ep.identity)
        self.store.delete(ep.id)
        self._release_addresses(ep.ipv4, ep.ipv6)
        if ep.state != State.DISCONNECTED:
            ep.state = State.DISCONNECTED
        # The address may be named by a policy CIDR: fall back to what the rest wants.
        self._write_ipcache(ipaddress.ip_network(a) for a in ep.addresses())
        return affected

    def _release_identity(self, ident: int) -> set[int]:
        """Drop a reference; when none remain, the identity leaves every peer's policy
        (its number is handed out again, maybe to other labels: a stale key would
        grant the newcomer what the old holder was allowed). Returns the endpoints
        whose policy changed."""
        if self.allocator.release(ident) > 0 or ident in self.remote_identities:
            return set()  # still held here, or by another node's endpoints
        return self.engine.remove_identity(ident)

    def set_endpoint_labels(self, ref: str | int, set_labels: Mapping[str, str], unset: Iterable[str]) -> Endpoint:
        ep = self.find(ref)
        check_pod_labels(set_labels, "--set")
        labels = dict(ep.labels)
        for key in unset:
            labels.pop(key, None)
        labels.update(set_labels)

        def change(e: Endpoint) -> None:
            e.labels, e.init_identity = labels, False

        self._relabel([ep], change)
        return ep

    # -- the cluster's pods and nodes ------------------------------------------------

    def set_pod_labels(
        self, namespace: str, name: str, labels: Mapping[str, str], service_account: str | None = None,
        istio_sidecar: bool = False,
    ) -> Endpoint | None:
        """The pod ``namespace/name`` has exactly these labels (and service account, and a
        Flagella-aware Istio sidecar or not): the Kubernetes watcher's entry point. Its
        endpoint leaves ``reserved:init`` for its real identity and waits (bounded) for the
        regenerations that causes. Before the pod's endpoint exists (the watcher usually
        sees a pod before its CNI ADD) all of it is remembered and the ADD uses it; returns
        the endpoint, or None when there is none yet.
        """
        _check_name("namespace", namespace)
        _check_name("pod name", name)
        if service_account is not None:
            _check_name("service account", service_account)
        check_pod_labels(labels, "labels")
        self.known_pods[(namespace, name)] = (dict(labels), service_account, istio_sidecar)
        ep = self.find_pod(namespace, name)
        if ep is None:
            return None
        now = (ep.labels, ep.service_account, ep.istio_sidecar)
        if not ep.init_identity and now == (dict(labels), service_account, istio_sidecar):
            return ep  # a pod update that changed nothing the identity or policy depends on

        def change(e: Endpoint) -> None:
            e.labels, e.service_account, e.init_identity = dict(labels), service_account, False
            e.istio_sidecar = istio_sidecar

        self._relabel([ep], change)
        return ep

    def forget_pod(self, namespace: str, name: str) -> None:
        """The pod is gone from the cluster: drop the labels `set_pod_labels` remembered."""
        self.known_pods.pop((namespace, name), None)

    def find_pod(self, namespace: str, name: str) -> Endpoint | None:
        for ep in self.endpoints.values():
            if ep.namespace == namespace and ep.name == name:
                return ep
        return None

    def use_node_pod_cidrs(self, ipv4: str, ipv6: str) -> None:
        """Allocate pod addresses from this node's PodCIDRs (each inside ``network.*``);
        addresses of existing endpoints stay theirs."""
        net = self.settings.network
        v4 = ipaddress.IPv4Network(ipv4) if ipv4 else None
        v6 = ipaddress.IPv6Network(ipv6) if ipv6 else None
        if v4 is not None and not v4.subnet_of(ipaddress.IPv4Network(net.ipv4_cidr)):
            raise InputError(f"node PodCIDR {v4}: outside network.ipv4_cidr {net.ipv4_cidr}")
        if v6 is not None and (not net.ipv6_cidr or not v6.subnet_of(ipaddress.IPv6Network(net.ipv6_cidr))):
            raise InputError(f"node PodCIDR {v6}: outside network.ipv6_cidr {net.ipv6_cidr or '(none)'}")
        if v4 is not None and v4 != self.ipam4.cidr:
            self.ipam4 = PodAddressAllocator(v4, [a for a in self.ipam4.in_use if a in v4])
        if v6 is not None and self.ipam6 is not None and v6 != self.ipam6.cidr:
            self.ipam6 = PodAddressAllocator(v6, [a for a in self.ipam6.in_use if a in v6])
        self.pod_cidr_missing = _missing_pod_cidrs(self.settings, v4=v4 is not None, v6=v6 is not None)
        log.info("node-pod-cidrs", ipv4=str(self.ipam4.cidr), ipv6=str(self.ipam6.cidr) if self.ipam6 else None)

    def set_namespace_labels(self, namespace: str, set_labels: Mapping[str, str], unset: Iterable[str]) -> dict[str, str]:
        _check_name("namespace", namespace)
        check_pod_labels(set_labels, "--set")
        labels = dict(self.namespace_labels.get(namespace, {}))
        for key in unset:
            labels.pop(key, None)
        labels.update(set_labels)
        self.namespace_labels[namespace] = labels
        self.files.save_namespaces(self.namespace_labels)
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
            self.store.save(ep)
            affected |= self.engine.upsert_endpoint(self._info(ep))
            self._ipcache_endpoint(ep)
            if old != new:
                affected |= self._release_identity(old)
        self._regenerate_and_wait(affected)

    # -- policy --------------------------------------------------------------------

    def import_policies(self, documents: list[Any], sources: list[str] | None = None) -> int:
        """Parse and import atomically; return the new revision without waiting for it
        to be realized."""
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
        return self.upsert_policies(policies)

    def upsert_policies(self, policies: list[Policy]) -> int:
        """Import parsed policies (the CLI's and the cluster's path); the new revision."""
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

    def delete_policy(self, kind: str, namespace: str, name: str) -> int:
        """Delete exactly one policy (no error when absent: the cluster's delete is final)."""
        key = (kind, namespace, name)
        if key not in self.engine.policies:
            return self.engine.revision
        revision, affected = self.engine.delete_policies([key])
        self._save_policies()
        self.regenerate(affected, revision)
        self._gc_cidr_identities()
        return revision

    def _sync_cidr_identities(self, policies: Iterable[Policy]) -> None:
        added = [net for net in rule_prefixes(policies) if net not in self.cidr_identities]
        labels = [cidr_identity_labels(net) for net in added]
        # One call for all of them: pipelined and batched on etcd, all or nothing.
        for net, ls, ident in zip(added, labels, self.allocator.allocate_many(labels), strict=True):
            self.cidr_identities[net] = ident
            self.engine.set_identity(ident, ls)
        self._write_ipcache(added)

    def _gc_cidr_identities(self) -> None:
        wanted = rule_prefixes(self.engine.policies.values())
        gone = [n for n in self.cidr_identities if n not in wanted]
        affected: set[int] = set()
        for net in gone:
            affected |= self._release_identity(self.cidr_identities.pop(net))
        if affected:
            self.regenerate(affected)
        self._write_ipcache(gone)

    def refresh_host_addresses(self) -> int:
        """Read the host's addresses again (the ``host-addresses`` controller): an address
        the node gained (DHCP, a new interface) is ``reserved:host`` from now on, one it lost
        is no longer. Returns how many changed."""
        now = self.dp.host_addresses()
        changed = set(now) ^ set(self.host_ips)
        if not changed:
            return 0
        log.info("host-addresses-changed", added=sorted(map(str, set(now) - set(self.host_ips))),
                 removed=sorted(map(str, set(self.host_ips) - set(now))))
        self.host_ips = now
        self._write_ipcache(ipaddress.ip_network(a) for a in changed)
        return len(changed)

    def _write_ipcache(self, prefixes: Iterable[IPNetwork]) -> None:
        """Make these ipcache entries what the full desired ipcache says (an endpoint's
        own address wins over a policy CIDR that names it exactly)."""
        desired = self.desired_ipcache()
        self.kernel.set_ipcache(desired, prefixes)
        for listener in self.ipcache_listeners:
            listener(desired)

    def _ipcache_endpoint(self, ep: Endpoint) -> None:
        self._write_ipcache(ipaddress.ip_network(a) for a in ep.addresses())

    # -- regeneration ----------------------------------------------------------------

    def regenerate(self, ep_ids: Iterable[int], revision: int | None = None) -> set[int]:
        """Hand the resolved policy of ``ep_ids`` to the pipeline (at ``revision``).

        Endpoints not in ``ep_ids`` were not affected by the change: their policy
        already is ``revision``'s, realized as soon as their latest regeneration is.
        Returns the endpoints handed over.
        """
        revision = revision or self.engine.revision
        ids = set(ep_ids)
        requested = set()
        for ep_id in sorted(ids):
            ep = self.endpoints.get(ep_id)
            if ep is None or ep_id not in self.engine.resolved:
                continue
            self.pipeline.request(ep, revision, self._enforced_policy(ep))
            requested.add(ep_id)
        self.pipeline.advance([ep for ep in self.endpoints.values() if ep.id not in ids], revision)
        return requested

    def _regenerate_and_wait(self, ep_ids: Iterable[int]) -> None:
        """Regenerate and wait (bounded) until each is realized or failed visibly."""
        requested = self.regenerate(ep_ids)
        if requested:
            self.pipeline.wait_settled(requested, self.settings.regeneration.completion_timeout_s)

    def wait_for_revision(self, revision: int, timeout: float) -> list[Endpoint]:
        """Wait until every endpoint realized ``revision`` with every enforcer; return
        the endpoints that still lag after ``timeout`` seconds."""
        return self.pipeline.wait_revision(revision, timeout)

    def wait_idle(self, timeout: float = 10.0) -> list[Endpoint]:
        """Wait until every regeneration requested so far has been realized (tests, tools)."""
        return self.pipeline.wait_settled(list(self.endpoints), timeout)

    def desired_policy(self, ep: Endpoint) -> Any:
        """The kernel entries and endpoint row ``ep``'s current policy resolves to."""
        return self.kernel.desired(ep, self._enforced_policy(ep))

    def _enforced_policy(self, ep: Endpoint) -> EndpointPolicy:
        """What the enforcers realize: for a pod with an Istio sidecar, its inbound
        HTTP is left to the sidecar (no node-proxy redirect; L3/L4 unchanged)."""
        policy = self.engine.policy(ep.id).snapshot()
        return istio_sidecar.kernel_policy(policy) if ep.istio_sidecar else policy

    # -- controllers -------------------------------------------------------------------

    def desired_ipcache(self) -> dict[IPNetwork, int]:
        return desired_ipcache(
            self.cidr_identities,
            self.host_ips,
            ((addr, ep.identity) for ep in self.endpoints.values() for addr in ep.addresses()),
            self.cluster.remote_ipcache() if self.cluster is not None else None,
        )

    # -- cluster mode ---------------------------------------------------------------------

    def node_record(self) -> NodeRecord:
        """This node as it announces itself: name, node IPs (the host's), pod CIDRs."""
        assert self.cluster is not None
        net = self.settings.network
        cidrs = [ipaddress.ip_network(c) for c in (net.ipv4_cidr, net.ipv6_cidr) if c]
        return NodeRecord(self.cluster.local_node, tuple(self.host_ips), tuple(cidrs))

    def cluster_entries(self) -> dict[str, str]:
        """The keys this node should have in the kvstore (its node record and endpoints)."""
        assert self.cluster is not None
        endpoints = (
            (addr, ep.identity, labels_key(self._security_labels(ep)), ep.named_ports)
            for ep in self.endpoints.values()
            for addr in ep.addresses()
        )
        return self.cluster.own_entries(self.node_record(), endpoints)

    def apply_cluster(self, pairs: list[tuple[str, str]]) -> dict[str, str]:
        """Take a full read of the cluster prefix: remote endpoints and nodes into the
        ipcache, their identities into the policy engine. Returns `cluster_entries`."""
        assert self.cluster is not None
        change = self.cluster.replace(pairs)
        if self.cluster.errors != self._cluster_errors:
            for error in self.cluster.errors:
                log.warning("kvstore-entry-skipped", error=error)
            self._cluster_errors = list(self.cluster.errors)
        if change.nodes_added or change.nodes_removed:
            log.info("nodes-changed", added=sorted(change.nodes_added), removed=sorted(change.nodes_removed))
        # Policy before ipcache: a remote pod's address maps to its identity only once
        # every local endpoint's policy knows that identity (no window of false drops;
        # a removal fails closed meanwhile). Bounded by the completion timeout.
        affected = self._sync_remote_identities()
        if affected:
            self._regenerate_and_wait(affected)
        if change.prefixes:
            self._write_ipcache(change.prefixes)
        if self.settings.network.auto_direct_node_routes:
            own = [ipaddress.ip_network(c) for c in (self.settings.network.ipv4_cidr, self.settings.network.ipv6_cidr) if c]
            routes = self.cluster.node_routes(own)
            if routes != self._node_routes:
                self._node_routes = None  # a failure below retries on the next run
                self.dp.set_node_routes(routes)
                self._node_routes = routes
        return self.cluster_entries()

    def _sync_remote_identities(self) -> set[int]:
        """Remote endpoints' identities known to the policy engine, exactly; returns the
        local endpoints whose policy changed."""
        assert self.cluster is not None
        wanted = self.cluster.identities()
        affected: set[int] = set()
        for ident, announced in sorted(wanted.items()):
            labels = self.allocator.labels(ident)  # the backend's cache, else etcd by id
            if labels is None or labels_key(labels) != announced:
                # Ids are reused: the cache may hold what the id meant before.
                labels = self.allocator.labels_fresh(ident)
            if labels is None or labels_key(labels) != announced:
                log.warning("remote-identity-unknown", identity=ident, announced=announced)
                continue
            if self.engine.universe.selectors.labels(ident) != labels:
                affected |= self.engine.set_identity(ident, labels)
            self.remote_identities.add(ident)
        extras = self.cluster.extras()
        for ident in sorted(self.remote_identities):
            addrs, named = extras.get(ident, (frozenset(), {}))
            affected |= self.engine.set_remote_extras(ident, addrs, named)
        local = {ep.identity for ep in self.endpoints.values()} | set(self.cidr_identities.values())
        for ident in sorted(self.remote_identities - wanted.keys()):
            self.remote_identities.discard(ident)
            affected |= self.engine.set_remote_extras(ident, frozenset(), {})
            if ident not in local:
                affected |= self.engine.remove_identity(ident)
        return affected

    def sync_all(self, count: bool = True) -> int:
        """Repair drift in every map and every program attachment; return the number of repairs."""
        return self.kernel.sync(count) + self._sync_attachments(count)

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
        return self.kernel.ct_gc(tcp)

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
            "repairs": dict(self.kernel.repairs),
            "attach_repairs": dict(self.stats.attach_repairs),
            "regenerations": dict(self.pipeline.stats.outcomes),
            "not_ready": sorted(ep.id for ep in self.endpoints.values() if ep.state == State.NOT_READY),
            **({"cluster": self.cluster_status()} if self.cluster is not None else {}),
        }

    def cluster_status(self) -> dict[str, Any]:
        assert self.cluster is not None
        return {
            "node": self.cluster.local_node,
            "nodes": {
                name: {"ips": [str(a) for a in r.ips], "pod_cidrs": [str(c) for c in r.pod_cidrs]}
                for name, r in sorted(self.cluster.nodes.items())
            },
            "remote_endpoints": {
                str(addr): ident for eps in self.cluster.endpoints.values() for addr, ident in eps.items()
            },
            "errors": list(self.cluster.errors),
        }


def _missing_pod_cidrs(settings: AgentSettings, *, v4: bool, v6: bool) -> str:
    """Why endpoints must wait: a PodCIDR the ``k8s.require_*`` settings demand is unknown."""
    k8s = settings.k8s
    if not k8s.enabled:
        return ""
    missing = [
        flag for flag, wanted, have in (
            ("--k8s-require-ipv4-pod-cidr", k8s.require_ipv4_pod_cidr, v4),
            ("--k8s-require-ipv6-pod-cidr", k8s.require_ipv6_pod_cidr, v6),
        ) if wanted and not have
    ]
    if not missing:
        return ""
    return f"waiting for node {k8s.node_name}'s PodCIDR ({', '.join(missing)})"


def _parse_address(value: str | None, version: int, flag: str) -> Any:
    if not value:
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise InputError(f"{flag}: {value!r} is not an IP address") from None
    if addr.version != version:
        raise InputError(f"{flag}: {addr} is not an IPv{version} address")
    return addr


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

