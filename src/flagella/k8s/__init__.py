"""Kubernetes integration: watchers feeding the agent through `ClusterSink`.

- `translate`: pure mapping of API objects to the agent's terms.
- `watch`: list-then-watch of one kind, resourceVersion, bookmarks, 410 Gone.
- `controller`: the watchers together, CNP status write-back, `compose`.
- `runtime`: container runtime detection from its socket.

Tested against an HTTP test double of the API server serving recorded-shape
responses (tests/k8s/fixtures); no kube-apiserver binary can be had here.
"""

from flagella.k8s.controller import ClusterSink, Controller, api_client, compose
from flagella.k8s.runtime import detect_runtime
from flagella.k8s.translate import K8sSettings, NodeInfo, PodInfo

__all__ = ["ClusterSink", "Controller", "K8sSettings", "NodeInfo", "PodInfo", "api_client", "compose", "detect_runtime"]
