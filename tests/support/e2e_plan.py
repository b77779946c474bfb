"""Pure planning for the end-to-end conformance runner: addresses, policies, probes.

Nothing here does I/O; `tests/e2e/test_remap.py` checks it without root.

Addresses
---------
Real traffic may only go to addresses inside namespaces the test creates, so
the corpus' addresses are moved:

* **Externals** (``world/1.1.1.1``, ``ip:1.2.3.4``, ``external: [{ip: ...}]``)
  get one TEST-NET address each on the test's "world" namespace
  (`external_map`, global over all cases: the world is built once).
* **Pods** outside 10.244.0.0/16 (Cilium's 10.0.x.y, cyclonus' 1.2.3.4) get a
  10.244 address (`pod_map`): the low 16 bits are kept when that is free
  (10.1.10.1 -> 10.244.10.1, so prefixes of length >= 16 inside one /16
  translate exactly), otherwise the next free one of 10.244.250.0/24. The
  standard 3x3 addresses 10.244.{1,2,3}.{10,11,12} are kept and never handed
  out to other pods.
* **CIDRs in policies** (k8s ``ipBlock``, Cilium ``toCIDR``/``fromCIDR``/
  ``toCIDRSet``/``fromCIDRSet``, their ``except``) are rewritten so that every
  address of the case matches the new rule exactly when its original matched
  the old one (`rewrite_policy`). A prefix with no address of the case in it is
  kept (unless a moved address would fall into it), ``/0`` is kept, a prefix
  is translated with its addresses when they all moved by the same offset, or
  else becomes the smallest prefix covering the moved addresses (a new prefix
  must lie inside the pod range or one TEST-NET); every
  candidate is checked against all addresses of the case, and when none fits
  the rule is split into one /32 per address it matched (a peer list is an
  OR), or a placeholder prefix that matches nothing when it matched none.

Probes
------
`plan_probe` says, per corpus probe, whether it is checked with traffic
(``check``), only recorded (``info``, loopback), or skipped (with the reason).
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .cases import Case, Probe, Step, namespace_labels, pod_in_step

IPv4 = ipaddress.IPv4Address
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network

POD_NET4 = ipaddress.IPv4Network("10.244.0.0/16")
POD_NET6 = ipaddress.IPv6Network("fd00:10:244::/64")
#: 10.244.{1,2,3}.{10,11,12}: the standard 3x3 cluster (k8s-netpol/cluster.yaml), never reassigned.
STANDARD_IPS = frozenset(IPv4(f"10.244.{n}.{m}") for n in (1, 2, 3) for m in (10, 11, 12))
#: Pods that cannot keep their low 16 bits are numbered from here.
FALLBACK_POOL = ipaddress.IPv4Network("10.244.250.0/24")
#: Never given to a pod: network, gateway-like .1, broadcast of the pod /16.
RESERVED_POD_IPS = frozenset({IPv4("10.244.0.0"), IPv4("10.244.0.1"), IPv4("10.244.255.255")})
#: World addresses: TEST-NET-2 first, then TEST-NET-3 (never 192.0.2.0/24, the uplink).
WORLD_NETS = (ipaddress.IPv4Network("198.51.100.0/24"), ipaddress.IPv4Network("203.0.113.0/24"))
#: A prefix that matches no address of any case (replaces a rule that matched none).
PLACEHOLDER = ipaddress.IPv4Network("203.0.113.254/32")

CIDR_LIST_KEYS = ("toCIDR", "fromCIDR")
CIDR_SET_KEYS = ("toCIDRSet", "fromCIDRSet")


class RemapError(Exception):
    """The case cannot be moved onto the test's addresses."""


# -- externals ---------------------------------------------------------------------------------


def external_address(name: str, case: Case) -> str | None:
    """The (original) address of a probe endpoint that is not a pod, or None."""
    if name.startswith("ip:"):
        return name[3:]
    ext = case.externals.get(name)
    if ext is not None and ext.ip:
        return ext.ip
    if name.startswith("world/"):
        return name[len("world/"):]
    return None


def case_external_ips(case: Case) -> set[str]:
    out = {e.ip for e in case.externals.values() if e.ip}
    for step in case.steps:
        for p in step.probes:
            for name in (p.src, p.dst):
                if name not in case.pods:
                    addr = external_address(name, case)
                    if addr:
                        out.add(addr)
    return out


def external_map(cases: Iterable[Case]) -> dict[str, str]:
    """Original external IPv4 address -> its TEST-NET address (sorted, deterministic)."""
    addrs: set[IPv4] = set()
    for case in cases:
        for a in case_external_ips(case):
            ip = ipaddress.ip_address(a)
            if ip.version == 4:
                addrs.add(ip)
    slots = [
        ip
        for net in WORLD_NETS
        for ip in net.hosts()
        if int(ip) & 0xFF >= 10 and ip not in PLACEHOLDER
    ]
    if len(addrs) > len(slots):
        raise RemapError(f"{len(addrs)} external addresses, only {len(slots)} TEST-NET slots")
    return {str(a): str(slots[i]) for i, a in enumerate(sorted(addrs))}


# -- pods --------------------------------------------------------------------------------------


def pod_map(case: Case) -> dict[str, str]:
    """Pod key -> its IPv4 address on the test (10.244.0.0/16)."""
    out: dict[str, str] = {}
    used: set[IPv4] = set(STANDARD_IPS) | set(RESERVED_POD_IPS)
    moved: list[tuple[str, IPv4]] = []
    for key, pod in sorted(case.pods.items()):
        ip = ipaddress.ip_address(pod.ip)
        if ip.version != 4:
            raise RemapError(f"pod {key}: IPv6 corpus address {ip} (not supported)")
        if ip in POD_NET4:
            if ip in used - STANDARD_IPS or str(ip) in out.values():
                raise RemapError(f"pod {key}: address {ip} is reserved or taken twice")
            out[key] = str(ip)
            used.add(ip)
        else:
            moved.append((key, ip))
    for key, ip in moved:
        cand = IPv4(int(POD_NET4.network_address) | (int(ip) & 0xFFFF))
        if cand in used or cand in FALLBACK_POOL:
            cand = next((c for c in FALLBACK_POOL.hosts() if c not in used and int(c) & 0xFF >= 10), None)
            if cand is None:
                raise RemapError("no free fallback pod address")
        out[key] = str(cand)
        used.add(cand)
    return out


def ipv6_for(ipv4: str) -> str:
    """The IPv6 twin of a pod address: 10.244.1.10 -> fd00:10:244::1:10 (octets read as hex digits)."""
    o = ipaddress.IPv4Address(ipv4).packed
    if ipaddress.IPv4Address(ipv4) not in POD_NET4:
        raise RemapError(f"{ipv4} is not a pod address")
    return str(ipaddress.IPv6Address(f"fd00:10:244::{int(str(o[2]), 16):x}:{int(str(o[3]), 16):x}"))


# -- CIDR rewriting ----------------------------------------------------------------------------

#: (original address, address on the test) for every pod and external of a case.
Pairs = list[tuple[IPAddr, IPAddr]]


def _net(text: str) -> IPNet:
    return ipaddress.ip_network(text, strict=False)


def _rule_matches(addr: IPAddr, cidr: IPNet, excepts: list[IPNet]) -> bool:
    if addr.version != cidr.version or addr not in cidr:
        return False
    return not any(addr.version == e.version and addr in e for e in excepts)


def _same_relation(pairs: Pairs, old: IPNet, new: IPNet) -> bool:
    return all(
        (o.version == old.version and o in old) == (n.version == new.version and n in new)
        for o, n in pairs
    )


def _format(text: str, new_addr: IPAddr, prefixlen: int) -> str:
    """``new_addr/prefixlen``, or a bare address when the original was bare."""
    return str(new_addr) if "/" not in text else f"{new_addr}/{prefixlen}"


def rewrite_cidr(text: str, pairs: Pairs) -> str | None:
    """One prefix with the same relation to every address of the case, or None."""
    net = _net(text)
    if net.prefixlen == 0:
        return text
    inside = [(o, n) for o, n in pairs if o.version == net.version and o in net]
    if not inside:
        landed = any(n.version == net.version and n in net for _, n in pairs)
        return None if landed else text
    literal = ipaddress.ip_address(text.split("/")[0])
    candidates: list[str] = []
    offsets = {int(n) - int(o) for o, n in inside if n.version == o.version}
    if len(offsets) == 1 and all(n.version == net.version for _, n in inside):
        (d,) = offsets
        host_bits = net.max_prefixlen - net.prefixlen
        moved = int(literal) + d
        if (int(net.network_address) + d) % (1 << host_bits) == 0 and 0 <= moved < (1 << net.max_prefixlen):
            addr_cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
            candidates.append(_format(text, addr_cls(moved), net.prefixlen))
    targets = [n for _, n in inside]
    if len({t.version for t in targets}) == 1:
        version = targets[0].version
        bits = 32 if version == 4 else 128
        for plen in range(bits, -1, -1):
            cover = ipaddress.ip_network(f"{targets[0]}/{plen}", strict=False)
            if all(t in cover for t in targets):
                candidates.append(str(cover))
                break
    for cand in candidates:
        c = _net(cand)
        if _within_test_space(c) and _same_relation(pairs, net, c):
            return cand
    return None


def _within_test_space(net: IPNet) -> bool:
    """A rewritten prefix stays inside the pod range or one TEST-NET (a /0 or /1 would be "world")."""
    spaces: tuple[IPNet, ...] = (POD_NET4, POD_NET6, *WORLD_NETS)
    return any(net.version == s.version and net.subnet_of(s) for s in spaces)  # type: ignore[arg-type]


def rewrite_rule(cidr: str, excepts: list[str], pairs: Pairs) -> list[tuple[str, list[str]]]:
    """A CIDR rule (prefix minus exceptions) as one or more rules with the same matches."""
    old_c, old_e = _net(cidr), [_net(e) for e in excepts]
    new_c = rewrite_cidr(cidr, pairs)
    new_e = [rewrite_cidr(e, pairs) for e in excepts]
    if new_c is not None and all(e is not None for e in new_e):
        c = _net(new_c)
        es = [_net(e) for e in new_e if e is not None]
        contained = all(e.version == c.version and e.subnet_of(c) for e in es)  # type: ignore[arg-type]
        same = all(_rule_matches(o, old_c, old_e) == _rule_matches(n, c, es) for o, n in pairs)
        if contained and same:
            return [(new_c, [e for e in new_e if e is not None])]
    matched = sorted({n for o, n in pairs if _rule_matches(o, old_c, old_e)}, key=lambda a: (a.version, int(a)))
    if not matched:
        return [(str(PLACEHOLDER), [])]
    return [(str(ipaddress.ip_network(a)), []) for a in matched]


def _rewrite_peer_list(items: list[Any], pairs: Pairs) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("ipBlock"), dict):
            block = item["ipBlock"]
            rules = rewrite_rule(str(block["cidr"]), [str(e) for e in block.get("except") or []], pairs)
            for cidr, excepts in rules:
                new_block: dict[str, Any] = {**block, "cidr": cidr}
                if excepts:
                    new_block["except"] = excepts
                else:
                    new_block.pop("except", None)
                out.append({**{k: _walk(v, pairs) for k, v in item.items() if k != "ipBlock"}, "ipBlock": new_block})
        else:
            out.append(_walk(item, pairs))
    return out


def _walk(node: Any, pairs: Pairs) -> Any:
    if isinstance(node, list):
        return _rewrite_peer_list(node, pairs)
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in CIDR_LIST_KEYS and isinstance(value, list):
            out[key] = [cidr for text in value for cidr, _ in rewrite_rule(str(text), [], pairs)]
        elif key in CIDR_SET_KEYS and isinstance(value, list):
            new: list[Any] = []
            for rule in value:
                if not isinstance(rule, dict) or "cidr" not in rule:
                    new.append(rule)
                    continue
                for cidr, excepts in rewrite_rule(str(rule["cidr"]), [str(e) for e in rule.get("except") or []], pairs):
                    r = {**rule, "cidr": cidr}
                    if excepts:
                        r["except"] = excepts
                    else:
                        r.pop("except", None)
                    new.append(r)
            out[key] = new
        else:
            out[key] = _walk(value, pairs)
    return out


def rewrite_policy(doc: Mapping[str, Any], pairs: Pairs) -> dict[str, Any]:
    """A copy of ``doc`` whose CIDRs are moved with the case's addresses."""
    return _walk(copy.deepcopy(dict(doc)), pairs)  # type: ignore[no-any-return]


def has_cidrs(doc: Any) -> bool:
    if isinstance(doc, list):
        return any(has_cidrs(x) for x in doc)
    if isinstance(doc, dict):
        return any(
            k in CIDR_LIST_KEYS or k in CIDR_SET_KEYS or k == "ipBlock" or has_cidrs(v)
            for k, v in doc.items()
        )
    return False


def has_l7_rules(doc: Any, in_ports: bool = False) -> bool:
    """Whether a policy carries L7 rules (``toPorts[].rules`` with something in it)."""
    if isinstance(doc, list):
        return any(has_l7_rules(x, in_ports) for x in doc)
    if isinstance(doc, dict):
        for k, v in doc.items():
            if in_ports and k == "rules" and v:
                return True
            if has_l7_rules(v, in_ports or k == "toPorts"):
                return True
    return False


# -- the plan of one case ----------------------------------------------------------------------


@dataclass(frozen=True)
class PodPlan:
    key: str
    namespace: str
    name: str
    labels: dict[str, str]
    service_account: str | None
    ipv4: str
    ipv6: str | None
    #: (port, "TCP"|"UDP") the pod's server listens on: its own ports plus every probed one.
    serve: frozenset[tuple[int, str]]
    #: "name=port/PROTO" for endpoint.create.
    named_ports: tuple[str, ...]
    #: TCP ports where the pod runs a Kafka broker (Tansu) instead of the plain server,
    #: and the topics it holds (each seeded with one record).
    kafka_ports: frozenset[int] = frozenset()
    kafka_topics: frozenset[str] = frozenset()

    def spec(self) -> tuple[Any, ...]:
        """What cannot change on a live endpoint (labels can), nor on its servers."""
        return (self.namespace, self.name, self.ipv4, self.ipv6, self.service_account, self.named_ports,
                self.kafka_ports, self.kafka_topics)


@dataclass(frozen=True)
class Peer:
    kind: str  # "pod" | "world" | "host"
    key: str = ""  # pod key
    address: str = ""  # pod address (destination) or world address


@dataclass(frozen=True)
class ProbePlan:
    probe: Probe
    action: str  # "check" | "info" | "skip"
    reason: str = ""
    src: Peer | None = None
    dst: Peer | None = None
    kind: str = ""  # "tcp" | "udp" | "icmp" | "kafka"
    port: int = 0
    icmp_type: int = 0
    http: dict[str, Any] | None = None
    #: kind "kafka": {"op": "produce" | "consume", "topic": ...}
    kafka: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return self.probe.label


@dataclass
class StepPlan:
    number: int
    policies: list[dict[str, Any]]
    namespace_labels: dict[str, dict[str, str]]
    pod_labels: dict[str, dict[str, str]]
    probes: list[ProbePlan]


@dataclass
class CasePlan:
    id: str
    pods: dict[str, PodPlan]
    namespaces: dict[str, dict[str, str]]
    steps: list[StepPlan]
    #: (port, proto) the world's server must listen on
    world_serve: set[tuple[int, str]] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


L7_FIELDS = ("http", "kafka", "dns")
PROTO_KINDS = {"TCP": "tcp", "UDP": "udp", "ICMP": "icmp", "ICMPV6": "icmp"}


def plan_probe(
    case: Case,
    probe: Probe,
    step_policies: list[dict[str, Any]],
    pods: Mapping[str, PodPlan],
    externals: Mapping[str, str],
    family: int = 4,
) -> ProbePlan:
    """How the runner treats one probe (pure)."""
    proto = probe.protocol.upper()
    if proto == "SCTP":
        return ProbePlan(probe, "skip", "SCTP: not built into this kernel")
    kind = PROTO_KINDS.get(proto)
    if kind is None:
        return ProbePlan(probe, "skip", f"protocol {probe.protocol} not probed")
    icmp_type = 0
    if kind == "icmp":
        t = 8 if probe.icmp_type is None else probe.icmp_type
        if t not in (8, 128):
            return ProbePlan(probe, "skip", f"ICMP type {t}: only echo requests are probed")
        icmp_type = 128 if family == 6 else 8
    elif probe.port is None:
        return ProbePlan(probe, "skip", "no port")

    src = _peer(case, probe.src, pods, externals, family, as_source=True)
    dst = _peer(case, probe.dst, pods, externals, family, as_source=False)
    for side, peer in (("from", src), ("to", dst)):
        if isinstance(peer, str):
            return ProbePlan(probe, "skip", f"{side} {getattr(probe, 'src' if side == 'from' else 'dst')}: {peer}")
    assert isinstance(src, Peer) and isinstance(dst, Peer)

    action, reason = "check", ""
    raw = probe.raw or {}
    l7 = next((f for f in L7_FIELDS if raw.get(f)), None)
    kafka: dict[str, Any] | None = None
    if l7 is not None:
        deny_mode = raw.get("deny_mode")
        if l7 == "http":
            # Through the agent's node proxy: an allowed request is answered by the pod,
            # a refused one gets 403 from Envoy, a dropped flow no answer.
            reason = f"http {probe.expect} through the node proxy"
        elif l7 == "kafka" and kafka_broker_probe(case, probe, family):
            # A real client against the Tansu broker in the destination pod, through the
            # node proxy's Kafka chain when L7 rules are in effect.
            kind, kafka = "kafka", kafka_operation(raw["kafka"])
            reason = f"kafka {kafka['op']} {probe.expect} with a real client"
        elif any(has_l7_rules(p) for p in step_policies):
            why = "Kafka probes run over IPv4 only" if l7 == "kafka" else "no DNS proxy"
            return ProbePlan(probe, "skip", f"{l7} with L7 rules in effect: {why}")
        elif probe.expect == "allow":
            reason = f"{l7} allow checked as its {proto} transport (no L7 rule in effect)"
        elif deny_mode == "drop":
            reason = f"{l7} deny_mode=drop checked as a dropped {proto} transport"
        elif deny_mode == "l7-reject":
            return ProbePlan(probe, "skip", f"{l7} deny by L7 rejection without L7 rules in effect")
        else:
            reason = f"{l7} deny without deny_mode, no L7 rule in effect: can only be an L3/L4 drop"
    if probe.loopback_ignored or (probe.src == probe.dst and src.kind == "pod"):
        action, reason = "info", "loopback: informational"
    return ProbePlan(
        probe,
        action,
        reason,
        src,
        dst,
        kind,
        int(probe.port or 0),
        icmp_type,
        dict(raw["http"]) if raw.get("http") else None,
        kafka,
    )


def kafka_broker_probe(case: Case, probe: Probe, family: int) -> bool:
    """A Kafka probe the runner makes with a real client: to a pod (which then runs a
    broker on the port), over IPv4 (the broker advertises one address)."""
    return bool(probe.kafka) and family == 4 and probe.dst in case.pods and probe.protocol.upper() == "TCP"


def kafka_operation(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The client operation a probe's ``kafka: {role|apiKey, topic}`` names: a produce, or
    a consume (assign and fetch from the start) for consume/fetch."""
    what = str(spec.get("role") or spec.get("apiKey") or "").lower()
    if what not in ("produce", "consume", "fetch"):
        raise ValueError(f"kafka probe {dict(spec)}: no client operation for {what!r}")
    return {"op": "produce" if what == "produce" else "consume", "topic": str(spec["topic"])}


def _peer(
    case: Case, name: str, pods: Mapping[str, PodPlan], externals: Mapping[str, str], family: int, as_source: bool
) -> Peer | str:
    if name in pods:
        pod = pods[name]
        addr = pod.ipv6 if family == 6 else pod.ipv4
        if addr is None:
            return "pod has no address of this family"
        return Peer("pod", name, addr)
    ext = case.externals.get(name)
    entity = ext.entity if ext is not None else name.split("/")[0]
    if name == "host" or entity == "host":
        if not as_source:
            return "the host is the root namespace: no test traffic is sent to it"
        if family == 6:
            return "host probes run over IPv4 only"
        return Peer("host")
    addr = external_address(name, case)
    if addr is None:
        return f"entity {entity!r} has no stand-in in this harness"
    if family == 6 or ipaddress.ip_address(addr).version != 4:
        return "world probes run over IPv4 only"
    if addr not in externals:
        return f"external {addr} has no TEST-NET address"
    return Peer("world", "", externals[addr])


def plan_case(case: Case, externals: Mapping[str, str], family: int = 4) -> CasePlan:
    """Everything the runner needs for ``case``, on the test's addresses."""
    v4 = pod_map(case)
    pairs: Pairs = [(ipaddress.ip_address(case.pods[k].ip), ipaddress.ip_address(a)) for k, a in v4.items()]
    pairs += [
        (ipaddress.ip_address(o), ipaddress.ip_address(n))
        for o, n in externals.items()
        if o in case_external_ips(case)
    ]
    if family == 6 and any(has_cidrs(doc) for s in case.steps for doc in s.policies):
        raise RemapError("CIDR rules are not remapped to IPv6")
    probed: dict[str, set[tuple[int, str]]] = {}
    brokers: dict[str, set[int]] = {}
    topics: dict[str, set[str]] = {}
    world_serve: set[tuple[int, str]] = set()
    for step in case.steps:
        for p in step.probes:
            proto = p.protocol.upper()
            if p.port is None or proto not in ("TCP", "UDP"):
                continue
            if p.kafka and kafka_broker_probe(case, p, family):
                brokers.setdefault(p.dst, set()).add(int(p.port))
                topics.setdefault(p.dst, set()).add(str(p.kafka["topic"]))
            if p.dst in case.pods:
                probed.setdefault(p.dst, set()).add((int(p.port), proto))
            else:
                world_serve.add((int(p.port), proto))
    pods: dict[str, PodPlan] = {}
    for key, pod in case.pods.items():
        serve = {(ps.port, ps.protocol.upper()) for ps in pod.ports if ps.protocol.upper() in ("TCP", "UDP")}
        serve |= probed.get(key, set())
        serve -= {(port, "TCP") for port in brokers.get(key, ())}
        named = tuple(sorted(f"{ps.name}={ps.port}/{ps.protocol.upper()}" for ps in pod.ports if ps.name))
        pods[key] = PodPlan(
            key=key,
            namespace=pod.namespace,
            name=pod.name,
            labels=dict(pod.labels),
            service_account=pod.service_account,
            ipv4=v4[key],
            ipv6=ipv6_for(v4[key]) if family == 6 else None,
            serve=frozenset(serve),
            named_ports=named,
            kafka_ports=frozenset(brokers.get(key, ())),
            kafka_topics=frozenset(topics.get(key, ())),
        )
    steps: list[StepPlan] = []
    namespaces = sorted({p.namespace for p in case.pods.values()} | set(case.namespaces))
    for step in case.steps:
        policies = [rewrite_policy(doc, pairs) for doc in step.policies]
        steps.append(
            StepPlan(
                number=step.number,
                policies=policies,
                namespace_labels={ns: namespace_labels(case, ns, step) for ns in namespaces},
                pod_labels={k: pod_in_step(case, k, step).labels for k in case.pods},
                probes=[plan_probe(case, p, step.policies, pods, externals, family) for p in step.probes],
            )
        )
    base = Step(0, [], {}, {}, [])
    return CasePlan(
        id=case.id,
        pods=pods,
        namespaces={ns: namespace_labels(case, ns, base) for ns in namespaces},
        steps=steps,
        world_serve=world_serve,
    )


# -- derived probes --------------------------------------------------------------------------------


def _mentions_ports(doc: Any) -> bool:
    if isinstance(doc, list):
        return any(_mentions_ports(x) for x in doc)
    if isinstance(doc, dict):
        return any(k in ("ports", "toPorts") or _mentions_ports(v) for k, v in doc.items())
    return False


def with_derived_icmp(case: Case) -> Case:
    """``case`` plus one ICMP echo probe per pod pair in every step whose policies name no port.

    Such policies (L3 only) give every protocol the verdict of the probed TCP
    table, ICMP included; the derived probes are how the IPv6 run exercises
    ICMPv6 between pods (the corpus has no pod-to-pod ICMP probe).
    """
    steps = []
    for step in case.steps:
        extra: list[Probe] = []
        tcp = [p for p in step.probes if p.protocol.upper() == "TCP" and not (p.http or p.kafka)]
        if tcp and not any(_mentions_ports(doc) for doc in step.policies):
            first_port = tcp[0].port
            seen = set()
            for p in tcp:
                if p.port != first_port or (p.src, p.dst) in seen:
                    continue
                if p.src not in case.pods or p.dst not in case.pods:
                    continue
                seen.add((p.src, p.dst))
                raw = {"from": p.src, "to": p.dst, "protocol": "ICMP", "icmp": {"type": 8}, "expect": p.expect,
                       "basis": f"derived: L3-only policy, same verdict as {first_port}/TCP"}
                if p.loopback_ignored:
                    raw["loopback_ignored"] = True
                extra.append(Probe(p.src, p.dst, None, "ICMP", p.expect, icmp_type=8,
                                   loopback_ignored=p.loopback_ignored, raw=raw))
        steps.append(Step(step.number, step.policies, step.namespace_labels, step.pod_labels, step.probes + extra))
    return Case(case.id, case.path, case.namespaces, case.pods, case.externals, steps)
