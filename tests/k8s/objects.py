"""Kubernetes objects for live scenarios against `tests.k8s.apiserver.FakeApiServer`.

Each builder answers the JSON an API server stores for the object (what
`FakeApiServer.apply` serves in lists and watch events), and the path it lives under.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PODS = "/api/v1/pods"
NAMESPACES = "/api/v1/namespaces"
NODES = "/api/v1/nodes"
NETWORK_POLICIES = "/apis/networking.k8s.io/v1/networkpolicies"
CNPS = "/apis/cilium.io/v2/ciliumnetworkpolicies"
CCNPS = "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies"


def pod(
    namespace: str, name: str, labels: dict[str, str], node: str, *,
    ips: tuple[str, ...] = (), service_account: str = "default",
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running" if ips else "Pending"}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}", "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": service_account,
                 "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.9"}]},
        "status": status,
    }


def namespace(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **labels}},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"},
    }


def node(name: str, *pod_cidrs: str) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if pod_cidrs:
        spec = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": spec,
        "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.10"}]},
    }


def cnp(namespace: str, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}, "generation": 1},
        "spec": spec,
    }


def ingress_spec(selector: dict[str, str], peer: dict[str, Any], port: int) -> dict[str, Any]:
    """``selector`` pods accept ``peer`` (an endpoint selector) on TCP ``port``."""
    return {
        "endpointSelector": {"matchLabels": selector},
        "ingress": [{"fromEndpoints": [peer], "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}]}],
    }


def kubeconfig(path: Path, server: str, token: str = "t0ken") -> Path:
    """A kubeconfig naming ``server`` with a bearer token (what ``--k8s-kubeconfig`` reads)."""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: double, cluster: {{server: '{server}'}}}}]\n"
        f"users: [{{name: agent, user: {{token: {token}}}}}]\n"
        "contexts: [{name: double, context: {cluster: double, user: agent}}]\n"
        "current-context: double\n"
    )
    return path
