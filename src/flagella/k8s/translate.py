"""Kubernetes objects in, the agent's terms out: pure functions, no I/O.

Every function here takes the JSON form of an API object (a dict exactly as the
API server sends it) and returns what the agent acts on, or raises `InputError`
naming the field. Nothing reads the network or the clock, except that
`policy_status` takes the time it stamps as an argument.

- Pods become `PodInfo`: namespace, name, service account, node, addresses and
  the pod's own labels with every key the agent owns removed (README "Labels the
  agent owns"): a pod that labels itself ``io.cilium.k8s.policy.serviceaccount``
  or ``io.kubernetes.pod.namespace`` gets the agent's derived value, not its own.
- Nodes become `NodeInfo` with their PodCIDRs, checked against `K8sSettings`
  (``--k8s-require-ipv4-pod-cidr``, ``--k8s-require-ipv6-pod-cidr``,
  ``--ipv6-cluster-alloc-cidr``, from which a node without an IPv6 PodCIDR gets
  one derived from its IPv4 PodCIDR, as Cilium 1.1 does).
- NetworkPolicy, CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy objects
  go through `flagella.policy.api.parse_policy` unchanged.
- `policy_status` builds the merge patch for ``status.nodes[<node>]`` of a CNP
  or CCNP: ok, error, enforcing, localPolicyRevision, lastUpdated and the
  policy's annotations mirrored.
"""

from __future__ import annotations

import ipaddress
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flagella.errors import InputError
from flagella.policy.labels import check_pod_labels, is_agent_owned

#: The container runtimes `detect_runtime` knows, by their socket.
RUNTIMES = ("docker", "containerd", "crio")


@dataclass(frozen=True)
class K8sSettings:
    """Options of the Kubernetes integration (Cilium's flag names in the comments).

    The agent watches the cluster when `enabled`: a kubeconfig is given, or it runs
    in a pod (``in_cluster``)."""

    #: --k8s-kubeconfig: the kubeconfig file naming the API server and credentials.
    kubeconfig: str = ""
    #: --k8s-in-cluster: the service account's token and the KUBERNETES_SERVICE_* variables.
    in_cluster: bool = False
    #: This node's name (``K8S_NODE_NAME``, --k8s-node-name); only its pods are endpoints here.
    node_name: str = ""
    #: --k8s-require-ipv4-pod-cidr: refuse a node object without an IPv4 PodCIDR.
    require_ipv4_pod_cidr: bool = False
    #: --k8s-require-ipv6-pod-cidr: refuse a node object without an IPv6 PodCIDR.
    require_ipv6_pod_cidr: bool = False
    #: --ipv6-cluster-alloc-cidr (at most a /64): every node's IPv6 PodCIDR must lie
    #: inside it ("" = any); a node with an IPv4 PodCIDR but no IPv6 one gets the /96
    #: derived from it as Cilium does (`derived_ipv6_pod_cidr`).
    ipv6_cluster_alloc_cidr: str = ""
    #: --container-runtime: ``auto`` detects from the sockets, else one of `RUNTIMES` or ``none``.
    container_runtime: str = "auto"
    #: Where the host's /run is visible to the agent (``/host`` in the DaemonSet).
    runtime_root: str = "/"
    #: Without a CNI plugin: the agent itself creates the endpoint of each pod of this
    #: node it learns of (addresses from the pod's status, else allocated) and deletes it
    #: with the pod. With ``flagella-cni`` the plugin creates them; leave this off.
    create_endpoints: bool = False
    #: Seconds a CNP status waits for the policy's revision to be realized on every
    #: endpoint before it is written with ``enforcing: false``.
    status_wait_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.kubeconfig) or self.in_cluster

    def validate(self) -> K8sSettings:
        if self.kubeconfig and self.in_cluster:
            raise InputError("k8s: kubeconfig and in_cluster exclude each other")
        if self.enabled and not self.node_name:
            raise InputError("k8s.node_name: required to watch a cluster (--k8s-node-name, K8S_NODE_NAME)")
        if not 0 < self.status_wait_s < float("inf"):
            raise InputError("k8s.status_wait_s: must be a positive number of seconds")
        if self.ipv6_cluster_alloc_cidr:
            try:
                alloc = ipaddress.IPv6Network(self.ipv6_cluster_alloc_cidr)
            except ValueError as exc:
                raise InputError(f"ipv6-cluster-alloc-cidr: {exc}") from None
            if alloc.prefixlen > 64:
                raise InputError(
                    f"ipv6-cluster-alloc-cidr: {alloc} is longer than /64 (each node takes a /96 "
                    "holding its IPv4 PodCIDR's address in bits 64-95)"
                )
        if self.container_runtime not in ("auto", "none", *RUNTIMES):
            raise InputError(
                f"container-runtime: {self.container_runtime!r} must be auto, none, "
                + ", ".join(RUNTIMES)
            )
        return self


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    service_account: str
    node_name: str
    ips: tuple[str, ...] = ()
    host_network: bool = False
    #: Pod-supplied label keys the agent owns, dropped from `labels` (for logs).
    dropped: tuple[str, ...] = field(default=())
    #: An Istio-injected pod's ``istio-proxy`` container: its volume mounts as
    #: (mountPath, the volume's hostPath or ""); empty for any other pod.
    istio_proxy_mounts: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NodeInfo:
    name: str
    ipv4_pod_cidr: str = ""
    ipv6_pod_cidr: str = ""
    addresses: tuple[str, ...] = ()


def _meta(obj: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise InputError(f"{what}: metadata: expected an object")
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        raise InputError(f"{what}: metadata.name: missing")
    return meta


def _section(obj: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = obj.get(name) or {}
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: {name}: expected an object")
    return value


def _str_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InputError(f"{where}: expected a map of strings")
    return dict(value)


def pod_info(pod: Mapping[str, Any]) -> PodInfo:
    """A pod object -> `PodInfo`, with agent-owned label keys removed."""
    meta = _meta(pod, "pod")
    where = f"pod {meta.get('namespace', '')}/{meta['name']}"
    namespace = meta.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise InputError(f"{where}: metadata.namespace: missing")
    raw = _str_map(meta.get("labels"), f"{where}: metadata.labels")
    labels = {k: v for k, v in raw.items() if not is_agent_owned(k)}
    check_pod_labels(labels, f"{where}: metadata.labels")
    spec = _section(pod, "spec", where)
    status = _section(pod, "status", where)
    pod_ips = status.get("podIPs") or []
    if not isinstance(pod_ips, list):
        raise InputError(f"{where}: status.podIPs: expected a list")
    raw_ips = [p.get("ip") for p in pod_ips if isinstance(p, Mapping)]
    if not raw_ips:
        raw_ips = [status.get("podIP")] if status.get("podIP") else []
    try:
        ips = tuple(str(ipaddress.ip_address(ip)) for ip in raw_ips if isinstance(ip, str))
    except ValueError as exc:
        raise InputError(f"{where}: status.podIPs: {exc}") from None
    return PodInfo(
        namespace=namespace,
        name=meta["name"],
        uid=str(meta.get("uid", "")),
        labels=labels,
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
        node_name=str(spec.get("nodeName") or ""),
        ips=ips,
        host_network=bool(spec.get("hostNetwork", False)),
        dropped=tuple(sorted(k for k in raw if is_agent_owned(k))),
        istio_proxy_mounts=_istio_proxy_mounts(meta, spec),
    )


ISTIO_STATUS_ANNOTATION = "sidecar.istio.io/status"
ISTIO_PROXY_CONTAINER = "istio-proxy"


def _istio_proxy_mounts(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The mounts of an injected pod's ``istio-proxy`` container (a regular container, or
    a native sidecar among the init containers), with the host path behind each; malformed
    entries are skipped (the pod is then simply not one with a Flagella-aware sidecar)."""
    annotations = meta.get("annotations")
    if not isinstance(annotations, Mapping) or ISTIO_STATUS_ANNOTATION not in annotations:
        return ()
    host_paths: dict[str, str] = {}
    for volume in _mappings(spec.get("volumes")):
        host = volume.get("hostPath")
        if isinstance(volume.get("name"), str) and isinstance(host, Mapping) and isinstance(host.get("path"), str):
            host_paths[volume["name"]] = host["path"]
    for container in (*_mappings(spec.get("containers")), *_mappings(spec.get("initContainers"))):
        if container.get("name") != ISTIO_PROXY_CONTAINER:
            continue
        return tuple(
            (mount["mountPath"], _host_dir(host_paths.get(str(mount.get("name")), ""), mount))
            for mount in _mappings(container.get("volumeMounts"))
            if isinstance(mount.get("mountPath"), str)
        )
    return ()


def _host_dir(host_path: str, mount: Mapping[str, Any]) -> str:
    """The host directory a mount shows: its volume's hostPath, below it with ``subPath``;
    "" when it cannot be known here (``subPathExpr``, a subPath leaving the volume)."""
    if not host_path or "subPathExpr" in mount:
        return ""
    sub = mount.get("subPath")
    if sub in (None, ""):
        return host_path
    if not isinstance(sub, str) or sub.startswith("/") or ".." in sub.split("/"):
        return ""  # the API server refuses these; never guess
    return posixpath.join(host_path, sub)


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def namespace_labels(ns: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    meta = _meta(ns, "namespace")
    return meta["name"], _str_map(meta.get("labels"), f"namespace {meta['name']}: metadata.labels")


def node_info(node: Mapping[str, Any], settings: K8sSettings) -> NodeInfo:
    """A node object -> `NodeInfo`; `InputError` when the settings' PodCIDR rules fail."""
    meta = _meta(node, "node")
    where = f"node {meta['name']}"
    spec = _section(node, "spec", where)
    listed = spec.get("podCIDRs") or []
    cidrs = [c for c in listed if isinstance(c, str)] if isinstance(listed, list) else []
    if not cidrs and isinstance(spec.get("podCIDR"), str):
        cidrs = [spec["podCIDR"]]
    v4 = v6 = ""
    for i, c in enumerate(cidrs):
        try:
            net = ipaddress.ip_network(c)
        except ValueError as exc:
            raise InputError(f"{where}: spec.podCIDRs[{i}]: {exc}") from None
        if net.version == 4 and not v4:
            v4 = str(net)
        elif net.version == 6 and not v6:
            v6 = str(net)
    if settings.require_ipv4_pod_cidr and not v4:
        raise InputError(f"{where}: spec.podCIDRs: no IPv4 PodCIDR (--k8s-require-ipv4-pod-cidr)")
    if settings.require_ipv6_pod_cidr and not v6:
        raise InputError(f"{where}: spec.podCIDRs: no IPv6 PodCIDR (--k8s-require-ipv6-pod-cidr)")
    if settings.ipv6_cluster_alloc_cidr and v4 and not v6:
        v6 = derived_ipv6_pod_cidr(settings.ipv6_cluster_alloc_cidr, v4)
    if v6 and settings.ipv6_cluster_alloc_cidr:
        alloc = ipaddress.IPv6Network(settings.ipv6_cluster_alloc_cidr)
        if not ipaddress.IPv6Network(v6).subnet_of(alloc):
            raise InputError(
                f"{where}: spec.podCIDRs: {v6} is outside --ipv6-cluster-alloc-cidr {alloc}"
            )
    addrs = tuple(
        str(a["address"])
        for a in (_section(node, "status", where).get("addresses") or [])
        if isinstance(a, Mapping) and a.get("type") in ("InternalIP", "ExternalIP")
    )
    return NodeInfo(meta["name"], v4, v6, addrs)


def derived_ipv6_pod_cidr(cluster_alloc_cidr: str, ipv4_pod_cidr: str) -> str:
    """A node's IPv6 pod range from ``--ipv6-cluster-alloc-cidr`` and its IPv4 PodCIDR.

    Cilium's rule (``IPv6ClusterAllocCIDRBase`` + the four bytes of the IPv4 range's
    address, ``/96``): ``fd00:10:244::/64`` and ``10.244.1.0/24`` give
    ``fd00:10:244:0:af4:100::/96``. Nodes with distinct IPv4 PodCIDRs get disjoint
    ranges without any coordination."""
    alloc = ipaddress.IPv6Network(cluster_alloc_cidr)
    v4 = ipaddress.IPv4Network(ipv4_pod_cidr)
    base = int(alloc.network_address) + (int(v4.network_address) << 32)
    return str(ipaddress.IPv6Network((base, 96)))


def policy_status(
    node: str,
    *,
    revision: int,
    error: str = "",
    enforcing: bool = False,
    annotations: Mapping[str, str] | None = None,
    now: str,
) -> dict[str, Any]:
    """The merge patch writing this node's entry of a CNP/CCNP ``status.nodes``."""
    entry: dict[str, Any] = {
        "ok": not error,
        "enforcing": enforcing and not error,
        "localPolicyRevision": revision,
        "lastUpdated": now,
        "annotations": dict(annotations or {}),
    }
    if error:
        entry["error"] = error
    return {"status": {"nodes": {node: entry}}}
