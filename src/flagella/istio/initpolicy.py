"""The policy that lets a sidecar bootstrap while its pod is ``reserved:init``.

Theory of operation. Until the agent knows a new pod's labels, its
endpoint carries the ``reserved:init`` identity, and the resolver enforces
both directions for it (default deny). istio-proxy must meanwhile resolve
names and reach istiod and its CA, or the pod never becomes ready. The
Cilium 1.1 release notes' answer (spec 10(c), ``istio-sidecar``): from the
host; DNS on 53/UDP to all; anything to the istio-system namespace.
`init_policy` builds that document from settings, so an operator can
change the DNS ports or the control plane's namespaces; the document goes
through the ordinary policy loader (`manifests/istio/init-policy.yaml` is
its default output).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flagella.errors import InputError
from flagella.policy.labels import NAMESPACE_LABEL


@dataclass(frozen=True)
class InitPolicySettings:
    #: Import the policy when the agent's Istio mode is on.
    enabled: bool = True
    dns_ports: Sequence[int] = (53,)
    namespaces: Sequence[str] = field(default=("istio-system",))
    #: The namespace the CiliumNetworkPolicy is created in (it selects reserved:init anyway).
    namespace: str = "default"

    def __post_init__(self) -> None:
        for port in self.dns_ports:
            if not 0 < port < 65536:
                raise InputError(f"istio.init_policy.dns_ports: {port} must be 1-65535")
        if not self.namespaces and not self.dns_ports:
            raise InputError("istio.init_policy: allows nothing (no dns_ports, no namespaces)")


def init_policy(settings: InitPolicySettings) -> dict[str, Any]:
    egress: list[dict[str, Any]] = []
    if settings.dns_ports:
        egress.append({
            "toEntities": ["all"],
            "toPorts": [{"ports": [{"port": str(p), "protocol": "UDP"} for p in settings.dns_ports]}],
        })
    for ns in settings.namespaces:
        egress.append({"toEndpoints": [{"matchLabels": {f"k8s:{NAMESPACE_LABEL}": ns}}]})
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "istio-sidecar", "namespace": settings.namespace},
        "spec": {
            "endpointSelector": {"matchLabels": {"reserved:init": ""}},
            "ingress": [{"fromEntities": ["host"]}],
            "egress": egress,
        },
    }


__all__ = ["InitPolicySettings", "init_policy"]
