"""The agent as a `flagella.k8s.ClusterSink`: what the watchers see, applied.

Theory of operation. The watchers (`flagella.k8s.compose`) run on threads of
their own and call a `ClusterBridge`. Every call that changes the agent runs
through ``locked``, which the server gives as "run this under the API lock, off
the event loop": a cluster change is one more request, serialized with the
CLI's, through the same `AgentCore` operations:

- policies: `AgentCore.upsert_policies` (the CLI's import path after parsing:
  all or nothing, errors named) and `AgentCore.delete_policy` (that one kind,
  namespace and name);
- namespace labels: `AgentCore.set_namespace_labels`, the CLI's ``namespace
  labels`` (keys the namespace lost are unset);
- pods of this node: `AgentCore.set_pod_labels` labels the pod's endpoint (and
  flags a Flagella-aware Istio sidecar, `has_flagella_sidecar`), or remembers
  both for the endpoint the CNI plugin creates later. With
  ``k8s.create_endpoints`` (no CNI plugin: tests, demos) the bridge creates the
  endpoint itself and deletes it with the pod (the agent stands in for the CNI);
- this node's object: `AgentCore.use_node_pod_cidrs`.

The cluster's policies are remembered by key in the state dir
(``cluster_policies.json``): after the first list following a restart,
`resync` deletes those the cluster no longer has (deleted while the agent was
down), and leaves policies imported with the CLI alone. With
``create_endpoints`` the cluster owns every endpoint: one whose pod is not in
the list is deleted.

`wait_realized` does not take the lock: it waits on the regeneration pipeline
(what ``policy import --wait`` waits for), so CNP status says ``enforcing``
only once every endpoint realized the policy's revision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import structlog

from flagella.agent.core import AgentCore
from flagella.errors import FlagellaError
from flagella.istio.sidecar import has_flagella_sidecar
from flagella.k8s import K8sSettings, NodeInfo, PodInfo
from flagella.policy.api import Policy

__all__ = ["ClusterBridge"]

log = structlog.get_logger("flagella.agent")

T = TypeVar("T")

#: The state file naming the policies taken from the cluster.
CLUSTER_POLICIES = "cluster_policies.json"


class ClusterBridge:
    """``locked`` runs a function under the agent's API lock and answers its result."""

    def __init__(self, core: AgentCore, settings: K8sSettings, locked: Callable[[Callable[[], Any]], Any]) -> None:
        self.core = core
        self.settings = settings
        self._locked = locked
        #: Pods whose endpoint could not be created yet (``create_endpoints``): retried
        #: when this node's object changes (a required PodCIDR arrives).
        self.pending: dict[tuple[str, str], PodInfo] = {}
        #: (kind, namespace, name) of every policy taken from the cluster, persisted.
        self.policies: set[tuple[str, str, str]] = {
            (str(k), str(n), str(m)) for k, n, m in core.files.read(CLUSTER_POLICIES, [])
        }

    def _run(self, fn: Callable[[], T]) -> T:
        return cast(T, self._locked(fn))

    # -- policies --------------------------------------------------------------------

    def _remember(self, key: tuple[str, str, str], present: bool) -> None:
        if (key in self.policies) != present:
            (self.policies.add if present else self.policies.discard)(key)
            self.core.files.write(CLUSTER_POLICIES, sorted(self.policies))

    def upsert_policy(self, policy: Policy) -> int:
        def apply() -> int:
            revision = self.core.upsert_policies([policy])
            self._remember(policy.key, True)
            return revision

        return self._run(apply)

    def wait_realized(self, revision: int, timeout: float) -> bool:
        lagging = self.core.wait_for_revision(revision, timeout)
        if lagging:
            log.info("k8s-policy-not-yet-enforced", revision=revision, endpoints=[ep.id for ep in lagging])
        return not lagging

    def delete_policy(self, kind: str, namespace: str, name: str) -> None:
        def apply() -> None:
            self.core.delete_policy(kind, namespace, name)
            self._remember((kind, namespace, name), False)

        self._run(apply)

    def resync(self, kind: str, present: set[tuple[str, str]]) -> None:
        if kind == "Pod":
            if self.settings.create_endpoints:
                self._run(lambda: self._drop_endpoints_without_pod(present))
            return
        for key in sorted(k for k in self.policies if k[0] == kind and (k[1], k[2]) not in present):
            log.info("k8s-policy-gone-meanwhile", kind=kind, namespace=key[1], name=key[2])
            self.delete_policy(*key)

    def _drop_endpoints_without_pod(self, present: set[tuple[str, str]]) -> None:
        for ep in list(self.core.endpoints.values()):
            if (ep.namespace, ep.name) not in present:
                log.info("k8s-pod-gone-meanwhile", pod=f"{ep.namespace}/{ep.name}", endpoint=ep.id)
                self.core.forget_pod(ep.namespace, ep.name)
                self.core.delete_endpoint(ep.id)

    # -- namespaces ------------------------------------------------------------------

    def set_namespace_labels(self, namespace: str, labels: Mapping[str, str]) -> None:
        def apply() -> None:
            gone = set(self.core.namespace_labels.get(namespace, {})) - set(labels)
            self.core.set_namespace_labels(namespace, labels, gone)

        self._run(apply)

    # -- pods ------------------------------------------------------------------------

    def upsert_pod(self, pod: PodInfo) -> None:
        self._run(lambda: self._apply_pod(pod))

    def _apply_pod(self, pod: PodInfo) -> None:
        key = (pod.namespace, pod.name)
        self.pending.pop(key, None)
        sidecar = self._has_sidecar(pod)
        ep = self.core.set_pod_labels(pod.namespace, pod.name, pod.labels, pod.service_account, sidecar)
        if ep is None and self.settings.create_endpoints:
            v4 = next((ip for ip in pod.ips if "." in ip), None)
            v6 = next((ip for ip in pod.ips if ":" in ip), None)
            try:
                self.core.create_endpoint(pod.name, pod.namespace, ipv4=v4, ipv6=v6)
            except FlagellaError:
                self.pending[key] = pod
                raise

    def _has_sidecar(self, pod: PodInfo) -> bool:
        """An Istio sidecar this agent serves: only with ``istio.enabled``, and only one
        that mounts the directory of this agent's xDS socket (`has_flagella_sidecar`)."""
        agent = self.core.settings
        return agent.istio.enabled and has_flagella_sidecar(
            pod.istio_proxy_mounts, agent.istio.socket_in_pod, agent.xds_socket_path
        )

    def delete_pod(self, namespace: str, name: str) -> None:
        def apply() -> None:
            self.pending.pop((namespace, name), None)
            self.core.forget_pod(namespace, name)
            ep = self.core.find_pod(namespace, name)
            if ep is not None and self.settings.create_endpoints:  # the agent is the CNI
                self.core.delete_endpoint(ep.id)

        self._run(apply)

    # -- nodes -----------------------------------------------------------------------

    def upsert_node(self, node: NodeInfo) -> None:
        if node.name != self.settings.node_name:
            return
        self._run(lambda: self.core.use_node_pod_cidrs(node.ipv4_pod_cidr, node.ipv6_pod_cidr))
        for pod in list(self.pending.values()):
            try:
                self._run(lambda pod=pod: self._apply_pod(pod))  # type: ignore[misc]
            except FlagellaError as exc:
                log.warning("k8s-pod-endpoint-failed", pod=f"{pod.namespace}/{pod.name}", error=str(exc))

    def delete_node(self, name: str) -> None:
        if name == self.settings.node_name:
            log.warning("k8s-own-node-deleted", node=name)
