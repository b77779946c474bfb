"""Which pods have a Flagella-aware Istio sidecar, and what the kernel keeps for them.

Theory of operation. Cilium 1.1 (spec 6.6) labels a pod
``io.cilium.k8s.policy.istiosidecarproxy=true`` when its injected
``istio-proxy`` container mounts the agent's socket directory; Flagella does
the same with its own directory (`SOCKET_DIR`). `detect_sidecar` reads a
Kubernetes Pod object (what a Kubernetes/CNI adapter sees) and returns
the label value to add; a value the pod's owner set in the pod's labels wins, so
it can be forced on or off. The label is agent-owned (``io.cilium.k8s.``),
so a pod cannot claim it through its labels: the embedded agent learns it
as the endpoint flag ``istio_sidecar`` (API ``endpoint create``), set by
whoever creates the endpoint from the Pod object (`detect_sidecar`), and
adds the label to the identity, so policies can select injected pods
(e.g. "only injected pods reach istio-system"); `is_sidecar` reads it back.

For such an endpoint the sidecar enforces HTTP after TLS termination, so
the kernel must not redirect its inbound HTTP to the node proxy (it would
see only ciphertext): `kernel_policy` turns every ingress REDIRECT (HTTP
and Kafka, whose sidecar filters come over ECDS too) into ALLOW for the
same (peer, protocol, port) key. L3/L4 stays exactly as resolved: which
peers reach which ports is still decided in BPF, and UDP, ICMP and IPv6,
which the sidecar ignores, are enforced there. Egress redirects are kept
(the sidecar only gets inbound policy). The sidecar's own config is built from the untouched
ingress, which `kernel_policy` carries along: it returns a `SidecarPolicy`,
an `EndpointPolicy` that every enforcer realizes as usual, with the resolved
ingress attached as ``sidecar_ingress`` for the one that feeds the sidecar
(`flagella.istio.enforcer`), so both come from the same snapshot.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flagella.policy.labels import ISTIO_SIDECAR_LABEL, Label, LabelSet
from flagella.policy.mapstate import Entry, MapState, Verdict
from flagella.policy.resolver import EndpointPolicy

SIDECAR_LABEL_KEY = ISTIO_SIDECAR_LABEL
SOCKET_DIR = "/var/run/flagella"
ISTIO_STATUS_ANNOTATION = "sidecar.istio.io/status"
PROXY_CONTAINER = "istio-proxy"


def detect_sidecar(pod: Mapping[str, Any]) -> str | None:
    """``"true"``/``"false"`` for the sidecar label of a Kubernetes Pod object; None if the user set it."""
    meta = pod.get("metadata") or {}
    if SIDECAR_LABEL_KEY in (meta.get("labels") or {}):
        return None
    if ISTIO_STATUS_ANNOTATION not in (meta.get("annotations") or {}):
        return "false"
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") != PROXY_CONTAINER:
            continue
        for mount in container.get("volumeMounts") or []:
            if str(mount.get("mountPath", "")).rstrip("/") == SOCKET_DIR:
                return "true"
    return "false"


def is_sidecar(labels: LabelSet) -> bool:
    """Whether an identity's labels say its pod has a Flagella-aware sidecar."""
    return Label("k8s", ISTIO_SIDECAR_LABEL, "true") in labels


@dataclass
class SidecarPolicy(EndpointPolicy):
    """What the enforcers realize for a pod with a sidecar, and what its sidecar gets.

    ``sidecar_ingress`` is the resolved ingress before `kernel_policy` (the HTTP
    redirects the sidecar enforces after mTLS)."""

    sidecar_ingress: MapState | None = None


def kernel_policy(policy: EndpointPolicy) -> SidecarPolicy:
    """``policy`` with the sidecar's inbound redirects turned into plain allows."""
    ingress = MapState(policy.ingress.enforced)
    for key, entry in policy.ingress:
        if entry.verdict == Verdict.REDIRECT:
            entry = Entry(Verdict.ALLOW, None, entry.rules)
        ingress.set(key, entry)
    return SidecarPolicy(ingress, policy.egress.copy(), policy.selected, sidecar_ingress=policy.ingress)


__all__ = ["SIDECAR_LABEL_KEY", "SOCKET_DIR", "SidecarPolicy", "detect_sidecar", "is_sidecar", "kernel_policy"]
