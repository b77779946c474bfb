"""Istio sidecars as Flagella workloads: node ids, SPIFFE principals, ECDS RBAC.

Theory of operation. In Istio sidecar mode the pod's own Envoy terminates
mutual TLS, so only it can see requests; Flagella keeps L3/L4 in the
kernel and hands the sidecar its HTTP policy as one RBAC filter config over
ECDS (spec xds-envoy-istio 3.6 (b)), under the resource name
`FILTER_NAME` that the EnvoyFilter in ``manifests/istio/`` asks for.

A stock sidecar identifies itself with the node id
``sidecar~<pod IP>~<pod>.<namespace>~<namespace>.svc.cluster.local``
(`parse_node`); `node_id` builds the same string from an endpoint, so the
agent can publish a workload's config under the id before its sidecar
connects. A node no endpoint matches falls back to the global resource,
which is deny-all (`deny_all_config`), and so does a sidecar before the
first config arrives (the EnvoyFilter's ``default_config``).

`workload_rbac` turns an endpoint's resolved ingress MapState into one
config for all inbound ports. The sidecar's inbound listener serves every
port, so each port's policies (from the lead's `http_rbac`, the same
kernel `decide` per peer) are ANDed with ``destination_port``; ports with
no HTTP rule pass (their L3/L4 verdict was taken in the kernel). A peer
identity whose labels carry a Kubernetes service account is matched by its
SPIFFE id ``spiffe://<trust domain>/ns/<ns>/sa/<sa>`` as the authenticated
principal (the URI SAN of its client certificate), ANDed with its address
set unless `IstioSettings.authenticated_only`; a peer without one (label
selectors on non-mesh peers, CIDRs, world) by its source addresses, which
Istio's REDIRECT interception keeps real.

`workload_kafka` is the Kafka part (spec xds-envoy-istio 3.6, Kafka via
network ext_proc): for each inbound port with Kafka rules, two ECDS
resources for the network filters an EnvoyFilter inserts in that port's
inbound chain, before Istio's ``tcp_proxy``: the network RBAC whose shadow
rules name the peer's identity (`kafka_resource_names`; principals: SPIFFE id
AND addresses, as for HTTP) and the network ext_proc config that sends the
bytes to the agent over the socket mounted into the pod. The chain key
carries the endpoint id, so the agent's Kafka processor finds the rules.

Pure: builds protobuf messages, does no I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2

from flagella.errors import InputError
from flagella.istio.initpolicy import InitPolicySettings
from flagella.policy.labels import NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL, LabelSet
from flagella.policy.mapstate import ANY_IDENTITY, MapState, Verdict
from flagella.proxy.kafka_envoy import (
    ChainKey,
    identity_rbac,
    ip_principals,
    kafka_ext_proc,
    sidecar_grpc_service,
    spiffe_principals,
)
from flagella.proxy.l7policy import MAX_PORTS_PER_DIRECTION, http_redirect_ports, port_redirects
from flagella.proxy.rbac import RBAC_TYPE_URL, PeerSet, http_rbac

#: The ECDS resource (and filter) name the EnvoyFilter subscribes to.
FILTER_NAME = "flagella.rbac"
DEFAULT_TRUST_DOMAIN = "cluster.local"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_POD_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


@dataclass(frozen=True)
class IstioSettings:
    """The ``istio`` group of the agent settings.

    - `enabled`: serve sidecars their policy over ECDS on the agent's xDS
      socket (the node proxy's, or a server of its own when the proxy is off),
      and import the init policy.
    - `trust_domain`: the mesh's SPIFFE trust domain (Istio's ``cluster.local``).
    - `authenticated_only`: match service-account peers by SPIFFE id alone,
      not also by source address (for peers whose addresses the agent does
      not know, e.g. behind an egress gateway).
    - `socket_in_pod`: the xDS socket's path inside pods (the mount of
      ``manifests/istio/pod-annotations.yaml``), the Kafka filters' target.
    - `init_policy`: the ``reserved:init`` policy the agent imports
      (`flagella.istio.initpolicy`); ``init_policy.enabled: false`` imports none."""

    enabled: bool = False
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    authenticated_only: bool = False
    socket_in_pod: str = "/var/run/flagella/xds.sock"
    init_policy: InitPolicySettings = dataclasses.field(default_factory=InitPolicySettings)

    def __post_init__(self) -> None:
        if not self.trust_domain or "/" in self.trust_domain or any(c.isspace() for c in self.trust_domain):
            raise InputError(f"istio.trust_domain: {self.trust_domain!r} is not a SPIFFE trust domain")
        if not self.socket_in_pod.startswith("/"):
            raise InputError(f"istio.socket_in_pod: {self.socket_in_pod!r} must be an absolute path")


@dataclass(frozen=True)
class SidecarNode:
    """What a stock Istio sidecar says about itself in its xDS node."""

    id: str
    pod_ip: IPAddress
    pod: str
    namespace: str
    instance_ips: tuple[IPAddress, ...] = ()
    service_account: str | None = None
    labels: Mapping[str, str] | None = None


def _address(text: str, field: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InputError(f"{field}: {text!r} is not an IP address") from None


def parse_node(node: str, metadata: Mapping[str, Any] | None = None) -> SidecarNode:
    """Parse a sidecar's node id and, when given, its metadata.

    Raises `InputError` naming the part (``node.id``, ``node.metadata.X``)
    that is malformed or disagrees with the id.
    """
    parts = node.split("~")
    if len(parts) != 4 or parts[0] != "sidecar":
        raise InputError(f"node.id: {node!r} is not sidecar~<ip>~<pod>.<namespace>~<domain>")
    ip = _address(parts[1], "node.id (pod IP)")
    pod, dot, namespace = parts[2].rpartition(".")
    if not dot or not _POD_NAME.fullmatch(pod) or not _DNS_LABEL.fullmatch(namespace):
        raise InputError(f"node.id: {parts[2]!r} is not <pod>.<namespace>")
    if parts[3].split(".", 1)[0] != namespace:
        raise InputError(f"node.id: domain {parts[3]!r} is not in namespace {namespace!r}")
    md = dict(metadata or {})
    for field, expected in (("NAMESPACE", namespace), ("NAME", pod)):
        if field in md and md[field] != expected:
            raise InputError(f"node.metadata.{field}: {md[field]!r} disagrees with node.id ({expected!r})")
    instance: tuple[IPAddress, ...] = ()
    if "INSTANCE_IPS" in md:
        if not isinstance(md["INSTANCE_IPS"], str):
            raise InputError("node.metadata.INSTANCE_IPS: must be a comma-separated string")
        instance = tuple(_address(a, "node.metadata.INSTANCE_IPS") for a in md["INSTANCE_IPS"].split(",") if a)
        if ip not in instance:
            raise InputError(f"node.metadata.INSTANCE_IPS: does not contain the node's pod IP {ip}")
    sa = md.get("SERVICE_ACCOUNT")
    if sa is not None and (not isinstance(sa, str) or not _POD_NAME.fullmatch(sa)):
        raise InputError(f"node.metadata.SERVICE_ACCOUNT: {sa!r} is not a service account name")
    labels = md.get("LABELS")
    if labels is not None and (
        not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values())
    ):
        raise InputError("node.metadata.LABELS: must map strings to strings")
    return SidecarNode(node, ip, pod, namespace, instance or (ip,), sa, dict(labels) if labels is not None else None)


def node_id(pod: str, namespace: str, ip: IPAddress, domain: str = "svc.cluster.local") -> str:
    """The node id a stock sidecar of this pod sends."""
    return f"sidecar~{ip}~{pod}.{namespace}~{namespace}.{domain}"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def identity_spiffe_ids(identities: Mapping[int, LabelSet], trust_domain: str) -> dict[int, str]:
    """The SPIFFE id of every identity that carries a namespace and a service account."""
    out = {}
    for ident, labels in identities.items():
        by_key = {lbl.key: lbl.value for lbl in labels if lbl.source == "k8s"}
        ns, sa = by_key.get(NAMESPACE_LABEL), by_key.get(SERVICE_ACCOUNT_LABEL)
        if ns and sa:
            out[ident] = spiffe_id(trust_domain, ns, sa)
    return out


def deny_all_config() -> http_rbac_pb2.RBAC:
    """Allow action with no policy: every request is denied (403)."""
    return http_rbac_pb2.RBAC(rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW), rules_stat_prefix="flagella")


def _port(port: int) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(destination_port=port)


def workload_rbac(
    ingress: MapState,
    peers: Mapping[int, PeerSet],
    identities: Mapping[int, LabelSet],
    settings: IstioSettings,
    wildcard_identities: Iterable[int] = (),
) -> http_rbac_pb2.RBAC:
    """The sidecar's RBAC config for all of one workload's inbound ports."""
    ports = http_redirect_ports(ingress)[:MAX_PORTS_PER_DIRECTION]
    spiffe = identity_spiffe_ids({i: ls for i, ls in identities.items() if i != ANY_IDENTITY}, settings.trust_domain)
    wild = tuple(wildcard_identities)
    policies: dict[str, rbac_pb2.Policy] = {}
    for port in ports:
        redirects = port_redirects(ingress, port)
        if not redirects:
            continue  # listed below as a policy port: nothing passes there
        config = http_rbac(
            redirects, peers, egress=False, wildcard_identities=wild,
            authenticated=spiffe, authenticated_only=settings.authenticated_only,
        )
        for name, policy in config.rules.policies.items():
            out = rbac_pb2.Policy()
            out.CopyFrom(policy)
            del out.permissions[:]
            out.permissions.append(
                rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=[_port(port), *policy.permissions]))
            )
            policies[f"port-{port}/{name}"] = out
    others = rbac_pb2.Permission(any=True)
    if ports:
        others = rbac_pb2.Permission(
            not_rule=rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=[_port(p) for p in ports]))
        )
    # Ports without HTTP rules: the kernel already took the L3/L4 verdict.
    policies["other-ports"] = rbac_pb2.Policy(permissions=[others], principals=[rbac_pb2.Principal(any=True)])
    return http_rbac_pb2.RBAC(
        rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies=policies), rules_stat_prefix="flagella"
    )


def ecds_resource(config: http_rbac_pb2.RBAC) -> extension_pb2.TypedExtensionConfig:
    """The ECDS resource the sidecar's filter subscribes to."""
    out = extension_pb2.TypedExtensionConfig(name=FILTER_NAME)
    out.typed_config.Pack(config)
    assert out.typed_config.type_url == RBAC_TYPE_URL
    return out


def kafka_resource_names(port: int) -> tuple[str, str]:
    """The ECDS names of a Kafka port's network RBAC and network ext_proc filters."""
    return f"flagella.kafka.rbac.{port}", f"flagella.kafka.ext_proc.{port}"


def kafka_ports(ingress: MapState) -> list[int]:
    """Every TCP port some Kafka REDIRECT key of ``ingress`` names, ascending."""
    ports: set[int] = set()
    for key, entry in ingress:
        if entry.verdict == Verdict.REDIRECT and entry.l7 is not None and entry.l7.parser == "kafka":
            if key.end_port - key.port >= MAX_PORTS_PER_DIRECTION:
                raise InputError(f"kafka rules on ports {key.port}-{key.end_port}: a sidecar takes single ports")
            ports.update(range(key.port, key.end_port + 1))
    return sorted(ports)


def workload_kafka(
    endpoint_id: int,
    ingress: MapState,
    peers: Mapping[int, PeerSet],
    identities: Mapping[int, LabelSet],
    settings: IstioSettings,
    socket_in_pod: str,
) -> dict[str, extension_pb2.TypedExtensionConfig]:
    """The sidecar's Kafka filter configs (ECDS resources by name) for every Kafka port."""
    spiffe = identity_spiffe_ids({i: ls for i, ls in identities.items() if i != ANY_IDENTITY}, settings.trust_domain)
    by_ip = ip_principals({i: p for i, p in peers.items() if i != ANY_IDENTITY})
    by_id = spiffe_principals({i: [uri] for i, uri in spiffe.items()})
    principals: dict[int, list[rbac_pb2.Principal]] = {}
    for ident in sorted(set(by_ip) | set(by_id)):
        if ident not in by_id:
            principals[ident] = by_ip[ident]
        elif settings.authenticated_only or ident not in by_ip:
            principals[ident] = by_id[ident]
        else:
            principals[ident] = [rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=[*by_id[ident], *by_ip[ident]]))]
    service = sidecar_grpc_service(socket_in_pod)
    out: dict[str, extension_pb2.TypedExtensionConfig] = {}
    for port in kafka_ports(ingress):
        chain = ChainKey(endpoint_id, False, port)
        rbac_name, ext_proc_name = kafka_resource_names(port)
        for name, message in ((rbac_name, identity_rbac(chain, principals)), (ext_proc_name, kafka_ext_proc(chain, service))):
            resource = extension_pb2.TypedExtensionConfig(name=name)
            resource.typed_config.Pack(message)
            out[name] = resource
    return out


__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "FILTER_NAME",
    "IstioSettings",
    "SidecarNode",
    "deny_all_config",
    "ecds_resource",
    "identity_spiffe_ids",
    "kafka_ports",
    "kafka_resource_names",
    "node_id",
    "parse_node",
    "spiffe_id",
    "workload_kafka",
    "workload_rbac",
]
