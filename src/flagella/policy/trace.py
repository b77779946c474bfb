"""`policy trace`: would this packet (or request) from A reach B?

A `Tracer` holds a `PolicyEngine` over a fixed set of policies and answers
queries one after another, adding the identities and endpoints each query
names as it goes (so a reachability matrix of thousands of pairs costs one
resolution per distinct endpoint, not per pair).

A side given by labels is an endpoint with that identity; its IP, if given,
is its address (CIDR rules match endpoints by address). A side given only
by an IP is outside the cluster: it gets the identity the ipcache would
give it, the CIDR identity of the most specific rule prefix that contains
it, or world. The reserved labels (``reserved:host``, ``reserved:world``)
name the reserved identities.

Both sides are evaluated, source egress and destination ingress, exactly as
the datapath does, through `MapState.lookup`. A redirected flow is then
judged at L7 when the query carries an HTTP or Kafka request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flagella.errors import InputError
from flagella.policy.api import Policy, Protocol
from flagella.policy.engine import PolicyEngine
from flagella.policy.identities import (
    MIN_ALLOCATED_ID,
    RESERVED_IDENTITIES,
    cidr_identity_labels,
    reserved_identity_labels,
    rule_prefixes,
)
from flagella.policy.l7 import HTTPRequest, KafkaRequest, l7_allows
from flagella.policy.labels import (
    NAMESPACE_LABEL,
    Label,
    LabelFilter,
    LabelSet,
)
from flagella.policy.mapstate import Decision, Verdict
from flagella.policy.resolver import EndpointInfo, IPAddress, NamedPorts, PolicySettings


@dataclass(frozen=True)
class Side:
    labels: LabelSet | None = None
    ip: IPAddress | None = None
    named_ports: NamedPorts = field(default_factory=dict)


@dataclass(frozen=True)
class TraceQuery:
    src: Side
    dst: Side
    #: (port or ICMP type, protocol); None = L3 only (any port).
    dport: tuple[int, Protocol] | None = None
    http: HTTPRequest | None = None
    kafka: tuple[KafkaRequest, ...] = ()


@dataclass(frozen=True)
class SideVerdict:
    evaluated: bool
    decision: Decision | None

    @property
    def allowed(self) -> bool:
        return self.decision is None or self.decision.allowed

    def to_json(self) -> dict[str, Any]:
        if self.decision is None:
            return {"verdict": "allowed", "enforced": False, "evaluated": False, "rules": []}
        d = self.decision
        return {
            "verdict": "allowed" if d.allowed else "denied",
            "enforced": d.enforced,
            "evaluated": True,
            "redirect": d.verdict == Verdict.REDIRECT,
            "rules": sorted(d.rules),
        }


@dataclass(frozen=True)
class TraceResult:
    query: TraceQuery
    src_identity: int
    dst_identity: int
    egress: SideVerdict
    ingress: SideVerdict
    l7: str | None  # "forwarded", "rejected", or None when not applicable
    selected_src: frozenset[str]
    selected_dst: frozenset[str]

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed and self.l7 != "rejected"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": "allowed" if self.allowed else "denied",
            "src_identity": self.src_identity,
            "dst_identity": self.dst_identity,
            "egress": self.egress.to_json(),
            "ingress": self.ingress.to_json(),
            "l7": self.l7,
        }
        rules: set[str] = set()
        for side in (self.egress, self.ingress):
            if side.decision is not None:
                rules |= side.decision.rules
        out["rules"] = sorted(rules)
        return out

    def to_text(self) -> str:
        def labels(side: Side) -> str:
            if side.labels is None:
                return f"ip {side.ip}"
            return ", ".join(sorted(str(lab) for lab in side.labels))

        q = self.query
        port = f"{q.dport[0]}/{q.dport[1].value}" if q.dport else "any"
        lines = [
            f"Tracing From: [{labels(q.src)}] (identity {self.src_identity}) => "
            f"To: [{labels(q.dst)}] (identity {self.dst_identity}) Ports: [{port}]",
        ]
        for name, side, selected in (
            ("Egress", self.egress, self.selected_src),
            ("Ingress", self.ingress, self.selected_dst),
        ):
            if side.decision is None:
                lines.append(f"{name}: source is not a local endpoint, not evaluated")
                continue
            d = side.decision
            lines.append(f"{name}: {len(selected)} rules selected")
            for rule in sorted(selected):
                lines.append(f"* Rule {rule}: selected")
            if not d.enforced:
                lines.append(f"  {name} enforcement disabled")
            for key, entry in d.matched:
                lines.append(
                    f"    matched identity={key.identity or 'any'} proto={key.protocol or 'any'} "
                    f"ports={key.port}-{key.end_port} -> {entry.verdict.name.lower()}"
                    f" (from {', '.join(sorted(entry.rules))})"
                )
            verdict = "allowed" if d.allowed else "denied"
            if d.verdict == Verdict.REDIRECT:
                verdict += " (redirected to L7 proxy)"
            lines.append(f"{name} verdict: {verdict}")
        if self.l7 is not None:
            lines.append(f"L7 verdict: {self.l7}")
        lines.append(f"Final verdict: {'ALLOWED' if self.allowed else 'DENIED'}")
        return "\n".join(lines)


class Tracer:
    """Answers trace queries against a fixed set of policies."""

    def __init__(
        self,
        policies: Iterable[Policy],
        settings: PolicySettings | None = None,
        label_filter: LabelFilter | None = None,
        identities: Mapping[LabelSet, int] | None = None,
    ) -> None:
        """``identities``: numbers already allocated (the live agent's), kept as they are."""
        self.policies = list(policies)
        self.label_filter = label_filter or LabelFilter()
        self.engine = PolicyEngine(settings)
        for ident, labels in reserved_identity_labels().items():
            self.engine.set_identity(ident, labels)
        self._ids: dict[LabelSet, int] = {}
        for labels, ident in (identities or {}).items():
            if ident >= MIN_ALLOCATED_ID:
                self._ids[labels] = ident
                self.engine.set_identity(ident, labels)
        self._next_id = max(self._ids.values(), default=MIN_ALLOCATED_ID - 1) + 1
        self._prefixes = sorted(rule_prefixes(self.policies), key=lambda n: -n.prefixlen)
        for net in self._prefixes:
            self._identity_for(cidr_identity_labels(net))
        self._endpoints: dict[tuple[int, IPAddress | None, tuple[Any, ...]], int] = {}
        self.engine.upsert_policies(self.policies)

    def _identity_for(self, labels: LabelSet) -> int:
        for name, ident in RESERVED_IDENTITIES.items():
            if labels == frozenset({Label("reserved", name)}):
                return ident
        found = self._ids.get(labels)
        if found is not None:
            return found
        new = self._next_id
        self._next_id += 1
        self._ids[labels] = new
        self.engine.set_identity(new, labels)
        return new

    def _ip_identity(self, ip: IPAddress) -> int:
        for net in self._prefixes:
            if net.version == ip.version and ip in net:
                return self._identity_for(cidr_identity_labels(net))
        return RESERVED_IDENTITIES["world"]

    def _side(self, side: Side) -> tuple[int, int | None]:
        """(identity, endpoint id or None)."""
        if side.labels is None:
            if side.ip is None:
                raise InputError("a trace side needs labels or an IP")
            return self._ip_identity(side.ip), None
        labels = self.label_filter.filter(side.labels)
        ident = self._identity_for(labels)
        if ident < MIN_ALLOCATED_ID and RESERVED_IDENTITIES.get("init") != ident:
            return ident, None  # host, world...: not a local endpoint
        named = tuple(sorted((k, tuple(sorted(v))) for k, v in side.named_ports.items()))
        key = (ident, side.ip, named)
        ep_id = self._endpoints.get(key)
        if ep_id is None:
            ep_id = len(self._endpoints) + 1
            self._endpoints[key] = ep_id
            self.engine.upsert_endpoint(
                EndpointInfo(
                    id=ep_id,
                    identity=ident,
                    labels=labels,
                    named_ports=side.named_ports,
                    addresses=frozenset({side.ip}) if side.ip is not None else frozenset(),
                )
            )
        return ident, ep_id

    def trace(self, q: TraceQuery) -> TraceResult:
        src_id, src_ep = self._side(q.src)
        dst_id, dst_ep = self._side(q.dst)
        if q.dport is None:
            port, proto = 0, 0
        else:
            port, proto = q.dport[0], q.dport[1].number
        egress = SideVerdict(src_ep is not None, None)
        ingress = SideVerdict(dst_ep is not None, None)
        sel_src: frozenset[str] = frozenset()
        sel_dst: frozenset[str] = frozenset()
        if src_ep is not None:
            pol = self.engine.policy(src_ep)
            egress = SideVerdict(True, pol.egress.lookup(dst_id, proto, port))
            sel_src = pol.selected
        if dst_ep is not None:
            pol = self.engine.policy(dst_ep)
            ingress = SideVerdict(True, pol.ingress.lookup(src_id, proto, port))
            sel_dst = pol.selected
        l7 = None
        if egress.allowed and ingress.allowed:
            l7 = self._l7(q, egress.decision, ingress.decision)
        return TraceResult(q, src_id, dst_id, egress, ingress, l7, sel_src, sel_dst)

    def _l7(self, q: TraceQuery, *decisions: Decision | None) -> str | None:
        requests: list[HTTPRequest | KafkaRequest] = []
        if q.http is not None:
            requests.append(q.http)
        requests.extend(q.kafka)
        redirected = [d for d in decisions if d is not None and d.verdict == Verdict.REDIRECT]
        if not redirected or not requests:
            return None
        for d in redirected:
            assert d.l7 is not None
            if not all(l7_allows(d.l7, r) for r in requests):
                return "rejected"
        return "forwarded"


def default_namespace(labels: LabelSet, namespace: str = "default") -> LabelSet:
    """Pods live in a namespace: add it when a label set names none (and is not reserved)."""
    if any(lab.source == "reserved" for lab in labels):
        return labels
    if any(lab.key == NAMESPACE_LABEL for lab in labels):
        return labels
    return labels | {Label("k8s", NAMESPACE_LABEL, namespace)}
