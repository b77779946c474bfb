"""Which pods have a Flagella-aware Istio sidecar, and what the kernel keeps for them.

Theory of operation. Cilium 1.1 (spec 6.6) labels a pod
``io.cilium.k8s.policy.istiosidecarproxy=true`` when its injected
``istio-proxy`` container mounts the agent's socket directory. Flagella does
the same, more strictly (`has_flagella_sidecar`): the mount must be at the
directory of ``istio.socket_in_pod`` *and* be the hostPath directory that holds
the agent's xDS socket, so an emptyDir at the right path does not count. The
pod's own label does not decide either way (Cilium let it win): the label is
agent-owned (``io.cilium.k8s.``), and a pod that could set it could switch off
the node proxy's L7 ingress enforcement for itself. The Kubernetes watcher
(`flagella.k8s.translate` reads the mounts, `flagella.agent.cluster` decides)
sets the endpoint flag ``istio_sidecar`` from it, on the fly; the API's
``endpoint create`` takes the flag directly. The flag adds the label to the
identity, so policies can select injected pods (e.g. "only injected pods
reach istio-system"); `is_sidecar` reads it back.

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

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from flagella.policy.labels import ISTIO_SIDECAR_LABEL, Label, LabelSet
from flagella.policy.mapstate import Entry, MapState, Verdict
from flagella.policy.resolver import EndpointPolicy

SIDECAR_LABEL_KEY = ISTIO_SIDECAR_LABEL


def has_flagella_sidecar(mounts: Iterable[tuple[str, str]], socket_in_pod: str, host_socket: str) -> bool:
    """Whether an injected pod's ``istio-proxy`` mounts (mountPath, hostPath) include the
    agent's xDS socket directory: ``socket_in_pod``'s directory, backed by the host
    directory of ``host_socket``."""
    want = (posixpath.dirname(posixpath.normpath(socket_in_pod)), posixpath.dirname(posixpath.normpath(host_socket)))
    return any(h and (posixpath.normpath(m), posixpath.normpath(h)) == want for m, h in mounts)


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


__all__ = ["SIDECAR_LABEL_KEY", "SidecarPolicy", "has_flagella_sidecar", "is_sidecar", "kernel_policy"]
