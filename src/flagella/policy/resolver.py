"""Rules + identities -> per-endpoint MapState (both directions).

Theory of operation
-------------------
For one endpoint and one direction:

1. *Selection.* The rules whose endpoint selector selects the endpoint's
   identity apply. The direction is enforced when the mode says so
   (``always``/``never``), when the endpoint is still ``reserved:init``, or
   (``default``) when some applying rule has a non-empty allow or deny
   section for it (and did not switch default deny off).
2. *Contributions.* Each peer rule of an applying rule yields keys: its
   peers (identity ids from the `SelectorCache`, or 0 for "any peer") times
   its ports (named ports resolved through the endpoint for ingress and
   through the peer for egress), each with allow/deny/redirect.
3. *Requires.* Every identity that fails a ``fromRequires``/``toRequires``
   precondition of an applying rule gets a deny key for all traffic.
4. *Specials.* With ``allow_localhost == "always"`` the host may always reach
   the endpoint (kubelet probes). With ``legacy_host_allows_world`` every
   ingress key of the host is copied to the world identities.
5. *L7 wildcarding* (spec 3.3): a peer that is allowed on a redirected port
   by a rule without L7 rules gets the wildcard L7 rule there, so the proxy
   passes all its requests.

Tiered rules (ClusterNetworkPolicy, ``Rule.tier`` admin/baseline) contribute
keys at their own precedence (`rule_precedence`), with a Pass verdict for
their pass sections; they never enforce a direction, and they take no part
in L7 wildcarding. `decide` in `mapstate` orders the tiers.

`PolicyEngine` keeps the repository, the identities and the resolved
endpoints together and recomputes only the endpoints a change can affect.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from flagella.policy.api import (
    CIDRRule,
    L7Rules,
    LabelSelector,
    PeerRule,
    PortProtocol,
    Protocol,
    Rule,
)
from flagella.policy.labels import Label, LabelSet
from flagella.policy.mapstate import (
    ANY_IDENTITY,
    ANY_PROTOCOL,
    PORT_MAX,
    Direction,
    Entry,
    Key,
    L7Policy,
    MapState,
    Verdict,
)
from flagella.policy.selectors import SelectorCache, matches

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NamedPorts = Mapping[str, frozenset[tuple[int, int]]]  # name -> {(port, protocol number)}

HOST_ID = 1
WORLD_ID = 2
INIT_LABEL = Label("reserved", "init")
WORLD_LABEL = Label("reserved", "world")

#: Protocols an ``ANY`` port expands into.
ANY_EXPANSION = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)


@dataclass(frozen=True)
class PolicySettings:
    """Semantics switches, with Cilium's defaults (spec 3.2, 3.6)."""

    enforcement: Literal["default", "always", "never"] = "default"
    #: ``always``: the host reaches every endpoint; ``policy``: the host is a peer like any other.
    allow_localhost: Literal["always", "policy"] = "always"
    legacy_host_allows_world: bool = False


@dataclass(frozen=True)
class EndpointInfo:
    """What the resolver needs to know about a local endpoint."""

    id: int
    identity: int
    labels: LabelSet
    named_ports: NamedPorts = field(default_factory=dict)
    addresses: frozenset[IPAddress] = frozenset()


@dataclass
class EndpointPolicy:
    ingress: MapState
    egress: MapState
    #: Names of the rules (policy names) that select the endpoint.
    selected: frozenset[str] = frozenset()

    def direction(self, d: Direction) -> MapState:
        return self.ingress if d == Direction.INGRESS else self.egress

    def snapshot(self) -> EndpointPolicy:
        """A copy later incremental updates do not touch (handed to enforcers)."""
        return EndpointPolicy(self.ingress.copy(), self.egress.copy(), self.selected)


#: Precedence of the first Admin rule: every Admin key is above 0 (higher first).
ADMIN_PRECEDENCE_BASE = 1 << 24


def rule_precedence(rule: Rule) -> int:
    """The key precedence of a rule's contributions (see `mapstate`).

    ``Rule.precedence`` (lower first) must be below `ADMIN_PRECEDENCE_BASE`;
    a ClusterNetworkPolicy's is at most ``1000 * 10000 + 24``.
    """
    order = min(max(rule.precedence, 0), ADMIN_PRECEDENCE_BASE - 1)
    if rule.tier == "admin":
        return ADMIN_PRECEDENCE_BASE - order
    if rule.tier == "baseline":
        return -1 - order
    return 0


def rule_name(rule: Rule) -> str:
    """A readable name for a rule: ``<namespace>/<policy name>`` from its origin labels."""
    name = ns = ""
    for label in rule.labels:
        key, _, value = label.partition("=")
        if key.endswith("io.cilium.k8s.policy.name"):
            name = value
        elif key.endswith("io.cilium.k8s.policy.namespace"):
            ns = value
    if name:
        return f"{ns}/{name}" if ns else name
    return ",".join(rule.labels) or "<unnamed rule>"


def _enclosing_networks(addrs: Iterable[IPAddress]) -> frozenset[IPNetwork]:
    """The networks that enclose all of the addresses of one family, per family."""
    nets: set[IPNetwork] = set()
    for version, bits in ((4, 32), (6, 128)):
        fam = [ipaddress.ip_network(a) for a in addrs if a.version == version]
        if fam:
            for plen in range(bits + 1):
                sup = {n.supernet(new_prefix=plen) for n in fam}
                if len(sup) == 1:
                    nets |= sup
    return frozenset(nets)


class IdentityUniverse:
    """The identities the resolver knows, with what CIDR rules need about them.

    Entity and CIDR peers are answered from the selector cache's label index
    (CIDR identities carry ``cidr:<prefix>`` for every enclosing prefix, and
    ``reserved:world``), plus a check of the endpoints' addresses.
    """

    def __init__(self) -> None:
        self.selectors = SelectorCache()
        self.addresses: dict[int, frozenset[IPAddress]] = {}
        self.named_ports: dict[int, NamedPorts] = {}
        #: network -> endpoint identities all of whose addresses of its family lie inside.
        self._supernets: dict[IPNetwork, set[int]] = {}
        #: identity -> the networks enclosing its addresses (its keys in ``_supernets``).
        self._address_nets: dict[int, frozenset[IPNetwork]] = {}
        self._networks: dict[int, frozenset[IPNetwork]] = {}

    def changed(self, ident: int | None = None) -> None:
        """Forget what was derived from ``ident``'s labels (all identities when None)."""
        if ident is None:
            self._networks.clear()
        else:
            self._networks.pop(ident, None)

    def networks(self, ident: int) -> frozenset[IPNetwork]:
        """Every CIDR that may contain ``ident``: its ``cidr:`` labels, or the networks
        enclosing all of its addresses of one family. A cheap prefilter for CIDR rules."""
        hit = self._networks.get(ident)
        if hit is None:
            nets: set[IPNetwork] = set()
            for lab in self.labels(ident):
                if lab.source == "cidr":
                    nets.add(ipaddress.ip_network(lab.key, strict=False))
            nets |= self._address_nets.get(ident, frozenset())
            hit = frozenset(nets)
            self._networks[ident] = hit
        return hit

    def set_addresses(self, ident: int, addrs: frozenset[IPAddress]) -> None:
        if addrs:
            self.addresses[ident] = addrs
        else:
            self.addresses.pop(ident, None)
        # The supernet index changes by this identity's networks only (O(prefix bits)).
        for net in self._address_nets.pop(ident, frozenset()):
            holders = self._supernets.get(net)
            if holders is not None:
                holders.discard(ident)
                if not holders:
                    del self._supernets[net]
        if addrs:
            nets = _enclosing_networks(addrs)
            self._address_nets[ident] = nets
            for net in nets:
                self._supernets.setdefault(net, set()).add(ident)
        self._networks.pop(ident, None)

    def within(self, network: IPNetwork) -> Collection[int]:
        """Endpoint identities all of whose addresses of ``network``'s family lie inside it
        (the index itself: do not mutate)."""
        return self._supernets.get(network, ())

    def labels(self, ident: int) -> LabelSet:
        return self.selectors.labels(ident) or frozenset()

    def ids(self) -> Iterable[int]:
        return self.selectors.identities.keys()



def entity_contains(entity: str, ident: int, universe: IdentityUniverse) -> bool:
    """Whether identity ``ident`` is part of ``entity`` (``all`` is handled by the caller)."""
    labels = universe.labels(ident)
    if not labels and ident not in universe.selectors.identities:
        return False
    if entity == "none":
        return False
    if entity in ("world", "world-ipv4", "world-ipv6"):
        if WORLD_LABEL not in labels:
            return False
        if entity == "world" or ident == WORLD_ID:
            return True
        version = 4 if entity == "world-ipv4" else 6
        return any(
            lab.source == "cidr" and ipaddress.ip_network(lab.key, strict=False).version == version
            for lab in labels
        )
    if entity == "cluster":
        return WORLD_LABEL not in labels and not any(lab.source == "cidr" for lab in labels)
    return Label("reserved", entity) in labels


def cidr_contains(rule: CIDRRule, ident: int, universe: IdentityUniverse) -> bool:
    """CIDR identities match by label, endpoints by their addresses of the rule's family.

    An endpoint matches when it has addresses of that family and all of them
    lie inside the CIDR and outside its excepts (a dual-stack pod matches an
    IPv4 block by its IPv4 address). Pods that share an identity must all be
    inside: an identity is allowed or not as a whole.
    """
    if rule.cidr.prefixlen == 0 and ident == WORLD_ID:
        return True
    labels = universe.labels(ident)
    if cidr_label(rule.cidr) in labels:
        return not any(cidr_label(e) in labels for e in rule.excepts)
    addrs = [a for a in universe.addresses.get(ident) or () if a.version == rule.cidr.version]
    return bool(addrs) and all(_in_cidr(a, rule) for a in addrs)


def _in_cidr(addr: IPAddress, rule: CIDRRule) -> bool:
    if addr.version != rule.cidr.version or addr not in rule.cidr:
        return False
    return not any(addr in e for e in rule.excepts)


def entity_ids(entity: str, universe: IdentityUniverse) -> set[int]:
    """The identities of an entity (not ``all``), from the label index."""
    sc = universe.selectors
    world = sc.with_label(WORLD_LABEL)
    if entity == "none":
        return set()
    if entity == "world":
        return set(world)
    if entity in ("world-ipv4", "world-ipv6"):
        any_prefix = "0.0.0.0/0" if entity == "world-ipv4" else "::/0"
        return (world & sc.with_label(Label("cidr", any_prefix))) | (world & {WORLD_ID})
    if entity == "cluster":
        return sc.all_ids() - world
    return set(sc.with_label(Label("reserved", entity)))


@functools.lru_cache(maxsize=1 << 16)
def cidr_label(network: IPNetwork) -> Label:
    """The ``cidr:<prefix>`` label of a network (cached: a rule of 5,000 CIDRs asks for
    its labels on every resolution of every endpoint it selects)."""
    return Label("cidr", str(network))


def cidr_ids(rule: CIDRRule, universe: IdentityUniverse) -> set[int]:
    """CIDR identities by label (index lookups), endpoints by address."""
    sc = universe.selectors
    out = set(sc.with_label(cidr_label(rule.cidr)))
    for e in rule.excepts:
        out -= sc.with_label(cidr_label(e))
    if rule.cidr.prefixlen == 0 and WORLD_ID in sc.all_ids():
        out.add(WORLD_ID)
    for ident in universe.within(rule.cidr):
        if cidr_contains(rule, ident, universe):
            out.add(ident)
    return out


def peer_ids(peer: PeerRule, universe: IdentityUniverse) -> set[int] | None:
    """The identities a peer rule's L3 part selects; None means any peer."""
    if peer.any_peer or "all" in peer.entities:
        return None
    out: set[int] = set()
    for sel in peer.selectors:
        out |= universe.selectors.select(sel)
    for entity in peer.entities:
        out |= entity_ids(entity, universe)
    for cidr in peer.cidrs:
        out |= cidr_ids(cidr, universe)
    return out


def peer_contains(peer: PeerRule, ident: int, universe: IdentityUniverse) -> bool:
    """Membership of one identity in a peer rule's L3 part (for per-identity updates)."""
    if peer.any_peer or "all" in peer.entities:
        return True
    if any(ident in universe.selectors.select(sel) for sel in peer.selectors):
        return True
    if any(entity_contains(e, ident, universe) for e in peer.entities):
        return True
    if peer.cidrs:
        if ident == WORLD_ID:
            return any(cidr_contains(c, ident, universe) for c in peer.cidrs)
        index = _cidrs_by_network(peer)
        return any(
            cidr_contains(c, ident, universe)
            for net in universe.networks(ident)
            for c in index.get(net, ())
        )
    return False


#: id(peer) -> (peer, its CIDR rules by network); the peer is kept so the id stays its own.
_CIDR_INDEX: dict[int, tuple[PeerRule, dict[IPNetwork, tuple[CIDRRule, ...]]]] = {}
_CIDR_INDEX_MAX = 4096


def _cidrs_by_network(peer: PeerRule) -> dict[IPNetwork, tuple[CIDRRule, ...]]:
    """A peer's CIDR rules indexed by network, so that a membership test costs
    O(networks of the identity), not O(CIDRs of the rule): a rule of 5,000 CIDRs
    is asked about every new identity by every endpoint it selects."""
    hit = _CIDR_INDEX.get(id(peer))
    if hit is not None and hit[0] is peer:
        return hit[1]
    index: dict[IPNetwork, list[CIDRRule]] = {}
    for c in peer.cidrs:
        index.setdefault(c.cidr, []).append(c)
    frozen = {net: tuple(rules) for net, rules in index.items()}
    if len(_CIDR_INDEX) >= _CIDR_INDEX_MAX:
        _CIDR_INDEX.clear()  # rules replaced long ago; the live ones are indexed again
    _CIDR_INDEX[id(peer)] = (peer, frozen)
    return frozen


def _l4_ranges(pp: PortProtocol) -> list[tuple[int, int, int]]:
    """(protocol, first, last) for a numeric port rule."""
    protos = ANY_EXPANSION if pp.protocol == Protocol.ANY else (pp.protocol,)
    if pp.port == 0:
        first, last = 0, PORT_MAX
    else:
        first, last = pp.port, max(pp.port, pp.end_port)
    return [(p.number, first, last) for p in protos]


def _named(pp: PortProtocol, named: NamedPorts) -> list[tuple[int, int, int]]:
    wanted = {p.number for p in (ANY_EXPANSION if pp.protocol == Protocol.ANY else (pp.protocol,))}
    return [(proto, port, port) for port, proto in named.get(pp.name, ()) if proto in wanted]


def _l7_policy(rules: L7Rules | None) -> L7Policy | None:
    if rules is None or rules.parser is None:
        return None
    if rules.http is not None:
        return L7Policy("http", http=frozenset(rules.http), wildcard=not rules.http)
    assert rules.kafka is not None
    return L7Policy("kafka", kafka=frozenset(rules.kafka), wildcard=not rules.kafka)


class Resolver:
    """Resolves endpoints against a fixed rule list and identity universe."""

    def __init__(self, settings: PolicySettings, universe: IdentityUniverse) -> None:
        self.settings = settings
        self.universe = universe

    def selecting_rules(self, ep: EndpointInfo, rules: Iterable[Rule]) -> list[Rule]:
        cache = self.universe.selectors
        if cache.labels(ep.identity) == ep.labels:
            return [r for r in rules if ep.identity in cache.select(r.endpoint_selector)]
        return [r for r in rules if matches(r.endpoint_selector, ep.labels)]

    def resolve(self, ep: EndpointInfo, rules: Iterable[Rule]) -> EndpointPolicy:
        return self.resolve_selected(ep, self.selecting_rules(ep, rules))

    def resolve_selected(self, ep: EndpointInfo, selected: list[Rule]) -> EndpointPolicy:
        return EndpointPolicy(
            ingress=self._direction(ep, selected, Direction.INGRESS),
            egress=self._direction(ep, selected, Direction.EGRESS),
            selected=frozenset(rule_name(r) for r in selected),
        )

    def _enforced(self, ep: EndpointInfo, rules: list[Rule], d: Direction) -> bool:
        mode = self.settings.enforcement
        if mode == "never":
            return False
        if mode == "always" or INIT_LABEL in ep.labels:
            return True
        for r in rules:
            if r.tier != "normal":
                continue  # tiered rules never put an endpoint into default deny
            allow, deny, dd = (
                (r.ingress, r.ingress_deny, r.default_deny_ingress)
                if d == Direction.INGRESS
                else (r.egress, r.egress_deny, r.default_deny_egress)
            )
            if dd is False:
                continue
            if allow or deny:
                return True
        return False

    def _direction(self, ep: EndpointInfo, rules: list[Rule], d: Direction) -> MapState:
        state = MapState(self._enforced(ep, rules, d))
        if self.settings.enforcement == "never":
            return state
        requires = self._collect(state, ep, rules, d, None)
        if requires:
            self._apply_requires(state, requires)
        if d == Direction.INGRESS and state.enforced and self.settings.allow_localhost == "always":
            state.add(Key(HOST_ID, ANY_PROTOCOL, 0, PORT_MAX), _LOCALHOST)
        if d == Direction.INGRESS and self.settings.legacy_host_allows_world:
            self._host_allows_world(state)
        _wildcard_l7(state)
        return state

    def identity_keys(
        self, ep: EndpointInfo, rules: list[Rule], d: Direction, ident: int, current: MapState
    ) -> dict[Key, Entry]:
        """The keys of one peer identity, as a full resolution would compute them.

        Keys of other identities never depend on ``ident`` (the "any peer"
        keys depend on rules only), so an identity that appears, disappears
        or changes labels is handled by replacing just its own keys.
        """
        if self.settings.enforcement == "never":
            return {}
        temp = MapState(current.enforced)
        requires = self._collect(temp, ep, rules, d, ident)
        known = ident in self.universe.selectors.identities  # as `_apply_requires` scans
        if requires and known and not self._satisfies(ident, requires):
            temp.add(Key(ident, ANY_PROTOCOL, 0, PORT_MAX), _REQUIRES)
        if d == Direction.INGRESS and ident == HOST_ID and temp.enforced and self.settings.allow_localhost == "always":
            temp.add(Key(HOST_ID, ANY_PROTOCOL, 0, PORT_MAX), _LOCALHOST)
        if (
            d == Direction.INGRESS
            and self.settings.legacy_host_allows_world
            and WORLD_LABEL in self.universe.labels(ident)
        ):
            for k in current.keys_of(HOST_ID):
                temp.add(Key(ident, k.protocol, k.port, k.end_port, k.precedence),
                         current.entries[k])
        for k in current.keys_of(ANY_IDENTITY):
            temp.set(k, current.entries[k])
        _wildcard_l7(temp)
        return {k: e for k, e in temp if k.identity == ident}

    def _collect(
        self, state: MapState, ep: EndpointInfo, rules: list[Rule], d: Direction, only: int | None
    ) -> list[LabelSelector]:
        requires: list[LabelSelector] = []
        for r in rules:
            name = rule_name(r)
            prec = rule_precedence(r)
            allow, deny, passed = (
                (r.ingress, r.ingress_deny, r.ingress_pass)
                if d == Direction.INGRESS
                else (r.egress, r.egress_deny, r.egress_pass)
            )
            for peer in allow or ():
                requires.extend(peer.requires)
                self._contribute(state, ep, peer, d, Verdict.ALLOW, name, only, prec)
            for peer in deny or ():
                self._contribute(state, ep, peer, d, Verdict.DENY, name, only, prec)
            if prec != 0:  # Pass only means something in a tier
                for peer in passed or ():
                    self._contribute(state, ep, peer, d, Verdict.PASS, name, only, prec)
        return requires

    def _contribute(
        self,
        state: MapState,
        ep: EndpointInfo,
        peer: PeerRule,
        d: Direction,
        verdict: Verdict,
        name: str,
        only: int | None = None,
        prec: int = 0,
    ) -> None:
        if only is None:
            ids = peer_ids(peer, self.universe)
        elif peer.any_peer or "all" in peer.entities:
            ids = None  # "any peer" keys do not depend on identities ...
        elif peer_contains(peer, only, self.universe):
            ids = {only}
        else:
            return
        # ... except egress named ports, which resolve through each peer.
        any_ids: Iterable[int] = () if only is not None and ids is None else _id_list(ids)
        rules = frozenset({name})
        plain = Entry(verdict, None, rules)  # one object for every peer (entries are immutable)
        if peer.l3_only:
            for ident in any_ids:
                state.add(Key(ident, ANY_PROTOCOL, 0, PORT_MAX, prec), plain)
            return
        for icmp in peer.icmps:
            proto = 1 if icmp.family == "IPv4" else 58
            for ident in any_ids:
                state.add(Key(ident, proto, icmp.type, icmp.type, prec), plain)
        for port_rule in peer.ports:
            l7 = _l7_policy(port_rule.rules)
            v = Verdict.REDIRECT if (l7 is not None and verdict == Verdict.ALLOW) else verdict
            entry = Entry(v, l7, rules)
            for pp in port_rule.ports:
                if not pp.name:
                    for proto, first, last in _l4_ranges(pp):
                        for ident in any_ids:
                            state.add(Key(ident, proto, first, last, prec), entry)
                elif d == Direction.INGRESS:
                    for proto, first, last in _named(pp, ep.named_ports):
                        for ident in any_ids:
                            state.add(Key(ident, proto, first, last, prec), entry)
                else:
                    # Egress named ports resolve through each peer's own port names.
                    if only is not None:
                        candidates: Iterable[int] = (only,)
                    else:
                        candidates = self.universe.named_ports.keys() if ids is None else ids
                    for ident in candidates:
                        named = self.universe.named_ports.get(ident, {})
                        for proto, first, last in _named(pp, named):
                            state.add(Key(ident, proto, first, last, prec), entry)

    def _satisfies(self, ident: int, requires: list[LabelSelector]) -> bool:
        return all(ident in self.universe.selectors.select(sel) for sel in requires)

    def _apply_requires(self, state: MapState, requires: list[LabelSelector]) -> None:
        satisfied: set[int] | None = None
        for sel in requires:
            ids = set(self.universe.selectors.select(sel))
            satisfied = ids if satisfied is None else satisfied & ids
        denied = set(self.universe.ids()) - (satisfied or set())
        for ident in denied:
            state.add(Key(ident, ANY_PROTOCOL, 0, PORT_MAX), _REQUIRES)

    def _host_allows_world(self, state: MapState) -> None:
        world = [i for i in self.universe.ids() if WORLD_LABEL in self.universe.labels(i)]
        host_keys = [(k, e) for k, e in state if k.identity == HOST_ID]
        for k, e in host_keys:
            for w in world:
                state.add(Key(w, k.protocol, k.port, k.end_port, k.precedence), e)


_LOCALHOST = Entry(Verdict.ALLOW, None, frozenset({"allow-localhost"}))
_REQUIRES = Entry(Verdict.DENY, None, frozenset({"requires"}))


def _id_list(ids: set[int] | None) -> Iterable[int]:
    return (ANY_IDENTITY,) if ids is None else ids


def _wildcard_l7(state: MapState) -> None:
    """Give peers allowed without L7 rules the wildcard L7 rule on redirected ports.

    Normal-tier keys only: a tiered allow decides on its own, it widens no redirect.
    """
    redirects = [
        (k, e) for k, e in state if e.verdict == Verdict.REDIRECT and k.precedence == 0
    ]
    if not redirects:
        return
    allows = [(k, e) for k, e in state if e.verdict == Verdict.ALLOW and k.precedence == 0]
    for rk, re_ in redirects:
        assert re_.l7 is not None
        for ak, ae in allows:
            if not ak.covers(rk):
                continue
            if ak.identity in (ANY_IDENTITY, rk.identity):
                re_ = Entry(Verdict.REDIRECT, re_.l7.with_wildcard(), re_.rules | ae.rules)
                state.set(rk, re_)
            elif rk.identity == ANY_IDENTITY:
                assert re_.l7 is not None
                key = Key(ak.identity, rk.protocol, rk.port, rk.end_port)
                wildcard = L7Policy(re_.l7.parser, wildcard=True)
                state.add(key, Entry(Verdict.REDIRECT, wildcard, ae.rules))


def _peer_sections(rule: Rule) -> tuple[tuple[PeerRule, ...] | None, ...]:
    return (
        rule.ingress, rule.egress, rule.ingress_deny, rule.egress_deny,
        rule.ingress_pass, rule.egress_pass,
    )


def rule_peer_selectors(rule: Rule) -> list[LabelSelector]:
    """Every selector in a rule's peer sections (for change tracking)."""
    out: list[LabelSelector] = []
    for section in _peer_sections(rule):
        for peer in section or ():
            out.extend(peer.selectors)
            out.extend(peer.requires)
    return out


def rule_has_peer_kinds(rule: Rule) -> bool:
    """Whether a rule has peers that are not plain selectors (entities, CIDRs, requires)."""
    for section in _peer_sections(rule):
        for peer in section or ():
            if peer.entities or peer.cidrs or peer.requires:
                return True
            if any(pp.name for pr in peer.ports for pp in pr.ports):
                return True
    return False
