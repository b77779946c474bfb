"""The endpoint record: what the agent knows and persists about one pod."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from flagella.endpoint.lifecycle import State, transition
from flagella.policy.labels import LabelSet, k8s_labels, reserved


@dataclass
class Endpoint:
    id: int
    name: str
    namespace: str
    labels: dict[str, str]
    namespace_labels: dict[str, str] = field(default_factory=dict)
    service_account: str | None = None
    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None
    #: Named container ports: name -> [(port, protocol number)].
    named_ports: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    netns: str = ""
    host_ifname: str = ""
    ifindex: int = 0
    identity: int = 0
    state: State = State.INIT
    #: Why the endpoint is not ready (``not-ready``), or what it waits for.
    state_reason: str = ""
    #: Set once creation finished (program attached): restore keeps only created endpoints.
    created: bool = False
    #: The policy revision every enforcer has confirmed for this endpoint.
    policy_revision: int = 0
    enforcing_ingress: bool = False
    enforcing_egress: bool = False
    #: Its Istio sidecar enforces its inbound HTTP (flagella.istio.sidecar); an identity label.
    istio_sidecar: bool = False
    #: CNI: the runtime's container id, the pod end's name and MAC, its MTU (0: the node's).
    container_id: str = ""
    ifname: str = ""
    mac: str = ""
    mtu: int = 0
    #: The pod's labels have not arrived yet (CNI ADD before the watcher): its identity is
    #: ``reserved:init`` until they do.
    init_identity: bool = False

    def set_state(self, new: State) -> None:
        self.state = transition(self.state, new)

    def identity_labels(self) -> LabelSet:
        """All labels; the security-relevant filter is applied by the agent."""
        if self.init_identity:
            return reserved("init")
        return k8s_labels(
            self.labels, self.namespace, self.namespace_labels, self.service_account,
            istio_sidecar=self.istio_sidecar,
        )

    def addresses(self) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return frozenset(a for a in (self.ipv4, self.ipv6) if a is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "namespace": self.namespace,
            "labels": dict(self.labels),
            "namespace_labels": dict(self.namespace_labels),
            "service_account": self.service_account,
            "ipv4": str(self.ipv4) if self.ipv4 else None,
            "ipv6": str(self.ipv6) if self.ipv6 else None,
            "named_ports": {k: [list(p) for p in v] for k, v in self.named_ports.items()},
            "netns": self.netns,
            "host_ifname": self.host_ifname,
            "ifindex": self.ifindex,
            "identity": self.identity,
            "state": self.state.value,
            "state_reason": self.state_reason,
            "created": self.created,
            "policy_revision": self.policy_revision,
            "istio_sidecar": self.istio_sidecar,
            "container_id": self.container_id,
            "ifname": self.ifname,
            "mac": self.mac,
            "mtu": self.mtu,
            "init_identity": self.init_identity,
            "policy_enforcement": {
                "ingress": self.enforcing_ingress,
                "egress": self.enforcing_egress,
            },
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Endpoint:
        return cls(
            id=int(obj["id"]),
            name=str(obj["name"]),
            namespace=str(obj["namespace"]),
            labels=dict(obj.get("labels") or {}),
            namespace_labels=dict(obj.get("namespace_labels") or {}),
            service_account=obj.get("service_account"),
            ipv4=ipaddress.IPv4Address(obj["ipv4"]) if obj.get("ipv4") else None,
            ipv6=ipaddress.IPv6Address(obj["ipv6"]) if obj.get("ipv6") else None,
            named_ports={
                k: [(int(p[0]), int(p[1])) for p in v]
                for k, v in (obj.get("named_ports") or {}).items()
            },
            netns=str(obj.get("netns", "")),
            host_ifname=str(obj.get("host_ifname", "")),
            ifindex=int(obj.get("ifindex", 0)),
            identity=int(obj.get("identity", 0)),
            state=State(obj.get("state", "init")),
            state_reason=str(obj.get("state_reason", "")),
            created=bool(obj.get("created", obj.get("state") == State.READY.value)),
            policy_revision=int(obj.get("policy_revision", 0)),
            istio_sidecar=bool(obj.get("istio_sidecar", False)),
            container_id=str(obj.get("container_id", "")),
            ifname=str(obj.get("ifname", "")),
            mac=str(obj.get("mac", "")),
            mtu=int(obj.get("mtu", 0)),
            init_identity=bool(obj.get("init_identity", False)),
        )
