"""Typed policy rules: what the parser produces and the resolver consumes.

Every policy document (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy,
Kubernetes NetworkPolicy and ClusterNetworkPolicy) is translated into the
same Cilium-form `Rule`s; ClusterNetworkPolicy rules carry a tier and a
precedence on top (see `Rule`).
The translation already applied the semantics that depend only on the
document, never on the cluster:

* label keys carry their source (``any:org``, ``k8s:app``, ``reserved:init``);
* selectors of a namespaced document are scoped to its namespace (spec 1.6);
* a NetworkPolicy's peers and policyTypes became Cilium peer rules (spec 2).

What remains for the resolver is cluster state: which identities exist,
which endpoint has which named ports, and which addresses belong to whom.

All classes are frozen and hashable, so a rule can be a dictionary key and a
selector can be cached by value.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Requirement operators, normalized to Kubernetes' spelling.
Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]

#: Where a rule is evaluated: ``admin`` before every ``normal`` (Cilium and
#: Kubernetes NetworkPolicy) rule, ``baseline`` only where no normal rule decides.
Tier = Literal["admin", "normal", "baseline"]


class Protocol(str, Enum):  # noqa: UP042 - str() spelling is part of messages
    """An L4 protocol as policy names it. ``ANY`` is expanded by the resolver."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"
    ICMP = "ICMP"
    ICMPV6 = "ICMPv6"
    ANY = "ANY"

    @property
    def number(self) -> int:
        """IANA protocol number; 0 for ANY."""
        return _PROTO_NUMBERS[self]


_PROTO_NUMBERS = {
    Protocol.TCP: 6,
    Protocol.UDP: 17,
    Protocol.SCTP: 132,
    Protocol.ICMP: 1,
    Protocol.ICMPV6: 58,
    Protocol.ANY: 0,
}


#: Protocol number -> the name policy spells it with (``TCP``, ``ICMPv6``...).
PROTOCOL_NAMES: dict[int, str] = {p.number: p.value for p in Protocol if p is not Protocol.ANY}


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry. ``key`` carries its source (``k8s:app``)."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelector:
    """A Kubernetes LabelSelector over source-qualified label keys.

    ``match_labels`` is sorted by key. The empty selector matches everything.
    """

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def is_wildcard(self) -> bool:
        return not self.match_labels and not self.match_expressions


@dataclass(frozen=True)
class PortProtocol:
    """A port, a port range or a named port, with a protocol.

    ``port == 0`` (and no name) means every port of the protocol.
    ``end_port`` is 0 for a single port, else the inclusive end of a range.
    ``name`` is set for a named port; ``port`` is then 0 until resolved.
    """

    port: int = 0
    protocol: Protocol = Protocol.ANY
    end_port: int = 0
    name: str = ""


@dataclass(frozen=True)
class HTTPRule:
    """One HTTP rule; empty fields match anything. Regexes are full matches."""

    method: str = ""
    path: str = ""
    host: str = ""
    #: ``"Name: value"`` (exact value) or ``"Name"`` (presence), as Cilium writes them.
    headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class KafkaRule:
    """One Kafka rule after role/apiKey expansion (spec 4).

    ``api_keys`` empty means every key. ``api_version`` None means any version.
    """

    api_keys: frozenset[int] = frozenset()
    api_version: int | None = None
    client_id: str = ""
    topic: str = ""


@dataclass(frozen=True)
class L7Rules:
    """The L7 part of a PortRule: at most one of the two kinds is set."""

    http: tuple[HTTPRule, ...] | None = None
    kafka: tuple[KafkaRule, ...] | None = None

    @property
    def parser(self) -> Literal["http", "kafka"] | None:
        if self.http is not None:
            return "http"
        if self.kafka is not None:
            return "kafka"
        return None


@dataclass(frozen=True)
class PortRule:
    ports: tuple[PortProtocol, ...]
    rules: L7Rules | None = None


@dataclass(frozen=True)
class ICMPField:
    """An ICMP type to allow; ``family`` picks ICMP (IPv4) or ICMPv6."""

    type: int
    family: Literal["IPv4", "IPv6"] = "IPv4"


@dataclass(frozen=True)
class CIDRRule:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class PeerRule:
    """One IngressRule/EgressRule (or their Deny forms), normalized.

    The L3 part is the union of ``selectors``, ``entities`` and ``cidrs``,
    or every peer when ``any_peer`` is set. A rule with no L3 member and no
    L4 member (Cilium's ``{}``) selects no peer and allows nothing; it only
    puts the endpoint into default deny.

    The L4 part: ``ports`` and ``icmps`` empty means all ports and protocols
    (an L3-only rule). Otherwise the union of the listed ports and ICMP types.

    ``requires`` are preconditions on the peer that grant nothing (spec 3.5).
    """

    selectors: tuple[LabelSelector, ...] = ()
    entities: tuple[str, ...] = ()
    cidrs: tuple[CIDRRule, ...] = ()
    any_peer: bool = False
    requires: tuple[LabelSelector, ...] = ()
    ports: tuple[PortRule, ...] = ()
    icmps: tuple[ICMPField, ...] = ()

    @property
    def l3_only(self) -> bool:
        return not self.ports and not self.icmps


@dataclass(frozen=True)
class Rule:
    """One Cilium rule, already scoped to its namespace.

    ``ingress``/``egress`` are None when the section was absent and a tuple
    (possibly empty) when present; only a non-empty section (or a non-empty
    deny section) puts a selected endpoint into default deny, unless
    ``enable_default_deny`` says otherwise for that direction.

    ``tier`` and ``precedence`` order the rules of a ClusterNetworkPolicy
    (``admin``/``baseline``): within a tier the rule with the lowest
    precedence that matches a packet decides it, alone. A tiered rule never
    puts an endpoint into default deny. ``ingress_pass``/``egress_pass`` hold
    its Pass peers: matching traffic skips the rest of the tier (they mean
    nothing in a ``normal`` rule and are ignored there).
    """

    endpoint_selector: LabelSelector
    ingress: tuple[PeerRule, ...] | None = None
    egress: tuple[PeerRule, ...] | None = None
    ingress_deny: tuple[PeerRule, ...] | None = None
    egress_deny: tuple[PeerRule, ...] | None = None
    #: Rule-origin labels, ``source:key=value`` strings.
    labels: tuple[str, ...] = ()
    description: str = ""
    #: enableDefaultDeny.ingress / .egress; None = the default (True).
    default_deny_ingress: bool | None = None
    default_deny_egress: bool | None = None
    tier: Tier = "normal"
    #: Order within the tier, lower first (ClusterNetworkPolicy: priority * 10000 + rule index).
    precedence: int = 0
    ingress_pass: tuple[PeerRule, ...] | None = None
    egress_pass: tuple[PeerRule, ...] | None = None


PolicyKind = Literal[
    "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy", "ClusterNetworkPolicy"
]


@dataclass(frozen=True)
class Policy:
    """One imported document: its identity and its translated rules."""

    kind: PolicyKind
    name: str
    namespace: str  # "" for cluster-wide documents
    rules: tuple[Rule, ...]
    #: The document as given (JSON-compatible), kept for `policy get`.
    source: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @cached_property
    def cidr_prefixes(self) -> frozenset[IPNetwork]:
        """Every CIDR and except the rules name, except /0 (computed once per document)."""
        out: set[IPNetwork] = set()
        for r in self.rules:
            for section in (r.ingress, r.egress, r.ingress_deny, r.egress_deny,
                            r.ingress_pass, r.egress_pass):
                for peer in section or ():
                    for c in peer.cidrs:
                        out.add(c.cidr)
                        out.update(c.excepts)
        return frozenset(n for n in out if n.prefixlen > 0)
