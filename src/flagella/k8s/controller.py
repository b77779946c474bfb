"""The Kubernetes watchers wired to the agent through a small interface.

`ClusterSink` is what the agent implements (`flagella.agent.cluster`):
policies in and out (parsed `Policy` documents from `flagella.policy.api`),
namespace labels, pods of this node, and nodes. `compose` builds one `Watcher`
per kind and a `Controller` that runs them on threads and translates their
events (`flagella.k8s.translate`) into sink calls.

After every CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy upsert the
controller writes this node's entry of the object's ``status.nodes``: ``ok``
with the revision the sink answered, ``enforcing`` once the sink says that
revision is realized on every endpoint (`ClusterSink.wait_realized`, bounded by
``status_wait_s``; written again with ``enforcing`` once it is, if it was not)
and the annotations mirrored; or ``error`` with the parser's
or the agent's message (nothing of a rejected policy is applied). Objects that
fail translation, or that the sink refuses, are logged and skipped; one bad pod
never stops the watch.
"""

from __future__ import annotations

import collections
import datetime
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog
from kubernetes import client

from flagella.errors import FlagellaError, InputError
from flagella.k8s.runtime import detect_runtime
from flagella.k8s.translate import (
    K8sSettings,
    NodeInfo,
    PodInfo,
    namespace_labels,
    node_info,
    pod_info,
    policy_status,
)
from flagella.k8s.watch import (
    CCNPS,
    CNPS,
    NAMESPACES,
    NETWORK_POLICIES,
    NODES,
    PODS,
    Obj,
    Resource,
    Watcher,
    WatchError,
    request,
)
from flagella.policy.api import Policy, parse_policy

log = structlog.get_logger("flagella.k8s")


class ClusterSink(Protocol):
    """What the agent does with cluster state. Calls come from watcher threads."""

    def upsert_policy(self, policy: Policy) -> int:
        """Import (or replace) one policy, all or nothing; answer its policy revision."""

    def wait_realized(self, revision: int, timeout: float) -> bool:
        """Wait until every endpoint enforces ``revision``; False when one still lags."""

    def delete_policy(self, kind: str, namespace: str, name: str) -> None: ...

    def set_namespace_labels(self, namespace: str, labels: Mapping[str, str]) -> None: ...

    def upsert_pod(self, pod: PodInfo) -> None:
        """Label this node's endpoint of the pod (labels already filtered), or remember
        the labels for the endpoint the CNI plugin creates later."""

    def delete_pod(self, namespace: str, name: str) -> None: ...

    def upsert_node(self, node: NodeInfo) -> None: ...

    def resync(self, kind: str, present: set[tuple[str, str]]) -> None:
        """After a full list of ``kind`` (policies, pods): the (namespace, name) the cluster
        holds. What the sink took from the cluster earlier (before a restart) and is not
        among them was deleted while nobody watched."""

    def delete_node(self, name: str) -> None: ...


def _utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    def __init__(
        self,
        api: client.ApiClient,
        sink: ClusterSink,
        settings: K8sSettings,
        *,
        clock: Callable[[], str] = _utcnow,
        timeout_s: int = 300,
    ) -> None:
        self.api = api
        self.sink = sink
        self.settings = settings.validate()
        self.clock = clock
        #: The latest messages of objects skipped (failed translation, or the sink refused
        #: them), and how many were skipped since the start.
        self.skipped: collections.deque[str] = collections.deque(maxlen=100)
        self.skipped_total = 0
        pods_on_node = f"spec.nodeName={settings.node_name}" if settings.node_name else ""
        table: list[tuple[Resource, Callable[[str, Obj], None], str]] = [
            (NAMESPACES, self._namespace, ""),
            (NODES, self._node, ""),
            (NETWORK_POLICIES, self._policy, ""),
            (CNPS, self._policy, ""),
            (CCNPS, self._policy, ""),
            (PODS, self._pod, pods_on_node),
        ]
        self.watchers = [
            Watcher(api, r, h, field_selector=f, timeout_s=timeout_s, on_listed=self._listed(r))
            for r, h, f in table
        ]
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        #: The revision of each CNP/CCNP ("kind/namespace/name") whose status was written last.
        self._status_revision: dict[str, int] = {}
        #: The node's container runtime (`compose` detects it; "none" until then).
        self.runtime = "none"

    # -- event handlers -------------------------------------------------------------

    def _listed(self, resource: Resource) -> Callable[[Mapping[str, Obj]], None] | None:
        if resource not in (NETWORK_POLICIES, CNPS, CCNPS, PODS):
            return None

        def listed(objects: Mapping[str, Obj]) -> None:
            present = {(ns, name) for ns, _, name in (k.partition("/") for k in objects)}
            try:
                self.sink.resync(resource.kind, present)
            except FlagellaError as exc:
                self._skip(f"{resource.kind} resync", exc)

        return listed

    def _skip(self, what: str, exc: FlagellaError) -> None:
        log.warning("k8s-object-skipped", object=what, error=str(exc))
        self.skipped.append(str(exc))
        self.skipped_total += 1

    def _namespace(self, op: str, obj: Obj) -> None:
        try:
            name, labels = namespace_labels(obj)
        except InputError as exc:
            return self._skip("namespace", exc)
        try:
            self.sink.set_namespace_labels(name, labels if op == "upsert" else {})
        except FlagellaError as exc:
            self._skip(f"namespace {name}", exc)

    def _node(self, op: str, obj: Obj) -> None:
        if op == "delete":
            self.sink.delete_node(obj["metadata"]["name"])
            return
        try:
            self.sink.upsert_node(node_info(obj, self.settings))
        except FlagellaError as exc:
            self._skip("node", exc)

    def _pod(self, op: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        if op == "delete":
            try:
                self.sink.delete_pod(str(meta.get("namespace", "")), str(meta.get("name", "")))
            except FlagellaError as exc:
                self._skip("pod", exc)
            return
        try:
            pod = pod_info(obj)
        except InputError as exc:
            return self._skip("pod", exc)
        if pod.host_network:
            return  # host-network pods are the host's identity, not endpoints
        if self.settings.node_name and pod.node_name != self.settings.node_name:
            return
        if pod.dropped:
            log.info("k8s-pod-reserved-labels-overwritten", pod=f"{pod.namespace}/{pod.name}",
                     keys=list(pod.dropped))
        try:
            self.sink.upsert_pod(pod)
        except FlagellaError as exc:
            self._skip(f"pod {pod.namespace}/{pod.name}", exc)

    def _policy(self, op: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        kind = str(obj.get("kind", ""))
        ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        self._status_revision.pop(f"{kind}/{ns}/{name}", None)
        if op == "delete":
            try:
                self.sink.delete_policy(kind, ns, name)
            except FlagellaError as exc:
                self._skip(kind, exc)
            return
        document = {k: v for k, v in obj.items() if k != "status"}
        try:
            policy = parse_policy(document)
        except InputError as exc:
            self._skip(kind, exc)
            self._write_status(obj, revision=0, error=str(exc))
            return
        try:
            revision = self.sink.upsert_policy(policy)
        except FlagellaError as exc:  # the agent refused it (e.g. conflicting L7 parsers)
            self._skip(kind, exc)
            self._write_status(obj, revision=0, error=str(exc))
            return
        if obj.get("kind") in (CNPS.kind, CCNPS.kind) and self.settings.node_name:
            key = f"{kind}/{ns}/{name}"
            self._status_revision[key] = revision
            enforcing = self.sink.wait_realized(revision, self.settings.status_wait_s)
            self._write_status(obj, revision=revision, enforcing=enforcing)
            if not enforcing:
                threading.Thread(
                    target=self._status_once_realized, args=(obj, key, revision), name="k8s-status", daemon=True
                ).start()

    def _status_once_realized(self, obj: Obj, key: str, revision: int) -> None:
        """Rewrite the status with ``enforcing`` once ``revision`` is realized, unless the
        policy changed (or went) meanwhile: its newer status is the one that counts."""
        while not self._stopping.is_set() and self._status_revision.get(key) == revision:
            if self.sink.wait_realized(revision, self.settings.status_wait_s):
                if self._status_revision.get(key) == revision:
                    self._write_status(obj, revision=revision, enforcing=True)
                return

    def _write_status(self, obj: Obj, *, revision: int, error: str = "", enforcing: bool = False) -> None:
        kind = obj.get("kind")
        if kind not in (CNPS.kind, CCNPS.kind) or not self.settings.node_name:
            return
        meta = obj["metadata"]
        res = CNPS if kind == CNPS.kind else CCNPS
        base = f"/apis/{res.group}/{res.version}"
        path = (f"{base}/namespaces/{meta['namespace']}/{res.plural}/{meta['name']}/status"
                if res is CNPS else f"{base}/{res.plural}/{meta['name']}/status")
        body = policy_status(
            self.settings.node_name, revision=revision, error=error, enforcing=enforcing,
            annotations=meta.get("annotations") or {}, now=self.clock(),
        )
        try:
            resp = request(self.api, "PATCH", path, body=body, content_type="application/merge-patch+json",
                           timeout_s=30)
            resp.read()
        except WatchError as exc:
            log.warning("k8s-status-write-failed", policy=path, error=str(exc))
            return
        if not 200 <= resp.status < 300:
            log.warning("k8s-status-write-failed", policy=path, status=resp.status, reason=resp.reason)

    # -- lifecycle --------------------------------------------------------------------

    def sync(self) -> None:
        """List every kind once (namespaces and policies before pods), in this thread."""
        for w in self.watchers:
            w.list()

    def start(self) -> None:
        """List every kind but pods first (retrying until the API server answers), then
        watch all: a pod's endpoint never precedes its node's PodCIDR, its namespace's
        labels or the policies that select it."""
        t = threading.Thread(target=self._bootstrap, name="k8s-sync", daemon=True)
        t.start()
        self._threads.append(t)

    def _bootstrap(self) -> None:
        for w in self.watchers:
            while w.resource is not PODS and not w.stopped:
                try:
                    w.list()
                    break
                except Exception as exc:  # WatchError, urllib3's: the API server is not there yet
                    log.warning("k8s-list-failed", kind=w.resource.kind, error=str(exc))
                    w.wait(1.0)
        for w in self.watchers:
            if w.stopped:
                return
            t = threading.Thread(target=w.run, name=f"k8s-{w.resource.plural}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stopping.set()
        for w in self.watchers:
            w.stop()
        deadline = time.monotonic() + 5.0  # a thread in a long watch read is a daemon: left behind
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))


def api_client(host: str = "", token: str = "", *, kubeconfig: str = "") -> client.ApiClient:
    """The client for ``kubeconfig`` when given, else ``host`` (tests), else in-cluster."""
    if kubeconfig:
        from kubernetes import config

        try:
            api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, persist_config=False
            )
        except (OSError, config.ConfigException) as exc:
            raise InputError(f"k8s.kubeconfig: {kubeconfig}: {exc}") from None
        return api
    if not host:
        from kubernetes import config

        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException as exc:
            raise InputError(f"k8s.in_cluster: {exc}") from None
        return client.ApiClient()
    cfg = client.Configuration()
    cfg.host = host
    if token:
        cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


def compose(
    sink: ClusterSink,
    settings: K8sSettings,
    api: client.ApiClient | None = None,
    *,
    runtime_root: str = "",
) -> Controller:
    """The watchers for this node, feeding ``sink``; call ``start()`` to run them.

    ``runtime_root`` (default: the settings') is where the host's /run is visible
    (``/host`` in the DaemonSet); the detected (or forced) container runtime is `Controller.runtime`.
    """
    if api is None:
        api = api_client(kubeconfig=settings.kubeconfig)
    ctl = Controller(api, sink, settings)
    ctl.runtime = detect_runtime(runtime_root or settings.runtime_root, settings.container_runtime)
    return ctl


__all__ = ["ClusterSink", "Controller", "api_client", "compose"]
