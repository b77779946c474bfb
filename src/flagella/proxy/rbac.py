"""HTTP policy as stock Envoy RBAC: one filter config per endpoint, direction and port.

Theory of operation. The datapath redirects a flow to the node proxy only
when its (peer identity, port) key says REDIRECT, so by the time Envoy sees
a request, L3/L4 policy has already been enforced in the kernel and the
port is known (Envoy selects the filter chain by it). What is left is the
per-request question of spec 3.3: does *any* L7 rule that applies to the
peer match the request? Each redirect key of the port becomes one RBAC
policy named ``id-<identity>`` (``id-any`` for the wildcard peer), and the
RBAC action is ALLOW: a request passes when some policy matches.

A policy is "peer is in the identity's address set AND (the L7 wildcard, or
one of the HTTP rules matches)". Envoy evaluates permissions before
principals and ``and`` lists in order, so the whole condition is put where
it is evaluated first and in the order we want: the cheap peer test runs
before any regex. On ingress the peer is the source (``direct_remote_ip``,
which TPROXY and ``original_src`` keep real), so everything lives in the
principal and the permission is ``any``. On egress the peer is the
destination (``destination_ip``), so everything lives in the permission.

Peer address sets follow the kernel's longest-prefix match over the
ipcache: an identity owns its prefixes minus the more specific prefixes
inside them that belong to other identities; world owns everything that no
other identity owns. An identity without addresses matches nothing.

HTTP rules follow spec 5: ``method``, ``path`` and ``host`` are full-match
RE2 regexes on ``:method``, ``:path`` (query string included) and
``:authority``; ``headers`` entries are exact values (``"Name: value"``) or
presence (``"Name"``). Empty fields match anything.

Authenticated peers (Istio sidecar mode): ``authenticated`` maps an
identity to the SPIFFE id its workloads present after mutual TLS. Such a
peer's condition becomes "the authenticated principal (the URI SAN of the
client certificate) is that id", ANDed with its address set unless
``authenticated_only``. These configs always use the rules form.

Large peer sets (spec 4.4): RBAC ``rules`` are evaluated linearly, so with
hundreds of addresses the peer test dominates (measured in bench/l7.py:
100 identities x 10 addresses cost a third of the request rate). Above
`MATCHER_THRESHOLD` prefixes the same policy is compiled into the unified
matcher API instead: an IP trie (``xds.type.matcher.v3.IPMatcher``, every
range ``exclusive``, which is exactly longest-prefix match) selects the
peer's identity in one lookup, and only that identity's rules, then the
any-peer rules, are evaluated; a peer without rules of its own falls
through to the any-peer rules, and nothing matched is denied.

Pure: builds protobuf messages, does no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.config.core.v3 import address_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.type.matcher.v3 import http_inputs_pb2, regex_pb2, string_pb2
from google.protobuf import wrappers_pb2
from xds.core.v3 import cidr_pb2
from xds.core.v3 import extension_pb2 as xds_extension_pb2
from xds.type.matcher.v3 import ip_pb2, matcher_pb2
from xds.type.matcher.v3 import regex_pb2 as xds_regex_pb2
from xds.type.matcher.v3 import string_pb2 as xds_string_pb2

from flagella.errors import InputError
from flagella.policy.api import HTTPRule
from flagella.policy.mapstate import ANY_IDENTITY, L7Policy

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

WORLD_IDENTITY = 2
#: Above this many peer prefixes in one config, compile to the matcher API (IP trie).
MATCHER_THRESHOLD = 32
RBAC_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
_EVERYWHERE: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("0.0.0.0/0"),
    ipaddress.IPv6Network("::/0"),
)


@dataclass(frozen=True)
class PeerSet:
    """The addresses of one identity: ``include`` minus ``exclude``."""

    include: tuple[IPNetwork, ...]
    exclude: tuple[IPNetwork, ...] = ()


def peer_sets(ipcache: Mapping[IPNetwork, int]) -> dict[int, PeerSet]:
    """Every identity's address set under longest-prefix match over ``ipcache``."""
    by_identity: dict[int, list[IPNetwork]] = {}
    for net, ident in ipcache.items():
        by_identity.setdefault(ident, []).append(net)
    by_identity.setdefault(WORLD_IDENTITY, []).extend(
        n for n in _EVERYWHERE if n not in ipcache
    )
    out: dict[int, PeerSet] = {}
    for ident, nets in by_identity.items():
        inside = {
            other
            for other, owner in ipcache.items()
            if owner != ident
            and any(other != net and _inside(other, net) for net in nets)
        }
        out[ident] = PeerSet(tuple(sorted(nets, key=_net_order)), tuple(sorted(inside, key=_net_order)))
    return out


def _inside(inner: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


def _net_order(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def _cidr(net: IPNetwork) -> address_pb2.CidrRange:
    return address_pb2.CidrRange(
        address_prefix=str(net.network_address), prefix_len=wrappers_pb2.UInt32Value(value=net.prefixlen)
    )


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(
        safe_regex=regex_pb2.RegexMatcher(regex=pattern)
    )


def header_matchers(rule: HTTPRule) -> list[route_components_pb2.HeaderMatcher]:
    """The header matchers of one HTTP rule, all of which must match (spec 5)."""
    out = []
    for name, pattern in ((":method", rule.method), (":path", rule.path), (":authority", rule.host)):
        if pattern:
            out.append(route_components_pb2.HeaderMatcher(name=name, string_match=_regex(pattern)))
    for spec in rule.headers:
        name, sep, value = spec.partition(" ")
        name = name.rstrip(":").lower()
        if sep and value:
            out.append(
                route_components_pb2.HeaderMatcher(
                    name=name, string_match=string_pb2.StringMatcher(exact=value)
                )
            )
        else:
            out.append(route_components_pb2.HeaderMatcher(name=name, present_match=True))
    return out


class _Side:
    """Builds the same logical tree as principals (ingress) or permissions (egress)."""

    def __init__(self, egress: bool) -> None:
        self.egress = egress
        self.cls = rbac_pb2.Permission if egress else rbac_pb2.Principal
        self.set_field = "rules" if egress else "ids"

    def any(self) -> rbac_pb2.Permission | rbac_pb2.Principal:
        return self.cls(any=True)

    def nothing(self) -> rbac_pb2.Permission | rbac_pb2.Principal:
        return self.negate(self.any())

    def negate(self, node: rbac_pb2.Permission | rbac_pb2.Principal) -> rbac_pb2.Permission | rbac_pb2.Principal:
        return self.cls(not_rule=node) if self.egress else self.cls(not_id=node)

    def all_of(self, nodes: list[rbac_pb2.Permission | rbac_pb2.Principal]) -> rbac_pb2.Permission | rbac_pb2.Principal:
        if not nodes:
            return self.any()
        if len(nodes) == 1:
            return nodes[0]
        key = "and_rules" if self.egress else "and_ids"
        return self.cls(**{key: {self.set_field: nodes}})

    def one_of(self, nodes: list[rbac_pb2.Permission | rbac_pb2.Principal]) -> rbac_pb2.Permission | rbac_pb2.Principal:
        if not nodes:
            return self.nothing()
        if len(nodes) == 1:
            return nodes[0]
        key = "or_rules" if self.egress else "or_ids"
        return self.cls(**{key: {self.set_field: nodes}})

    def address(self, net: IPNetwork) -> rbac_pb2.Permission | rbac_pb2.Principal:
        if self.egress:
            return rbac_pb2.Permission(destination_ip=_cidr(net))
        return rbac_pb2.Principal(direct_remote_ip=_cidr(net))

    def header(self, matcher: route_components_pb2.HeaderMatcher) -> rbac_pb2.Permission | rbac_pb2.Principal:
        return self.cls(header=matcher)

    def peers(self, peers: PeerSet | None) -> rbac_pb2.Permission | rbac_pb2.Principal:
        if peers is None or not peers.include:
            return self.nothing()
        own = self.one_of([self.address(n) for n in peers.include])
        if not peers.exclude:
            return own
        return self.all_of([own, self.negate(self.one_of([self.address(n) for n in peers.exclude]))])

    def authenticated(self, spiffe_id: str) -> rbac_pb2.Principal:
        return rbac_pb2.Principal(
            authenticated=rbac_pb2.Principal.Authenticated(
                principal_name=string_pb2.StringMatcher(exact=spiffe_id)
            )
        )

    def requests(self, l7: L7Policy) -> rbac_pb2.Permission | rbac_pb2.Principal | None:
        """None when every request passes (the L7 wildcard)."""
        if l7.wildcard or any(not header_matchers(r) for r in l7.http):
            return None
        rules = sorted(l7.http, key=lambda r: (r.method, r.path, r.host, r.headers))
        return self.one_of([self.all_of([self.header(m) for m in header_matchers(r)]) for r in rules])


def peer_condition(peers: PeerSet | None, egress: bool) -> rbac_pb2.Permission | rbac_pb2.Principal:
    """"The peer is in this address set": a principal on ingress (source address), a
    permission on egress (destination address); nothing matches an empty set."""
    return _Side(egress).peers(peers)


def http_rbac(
    redirects: Iterable[tuple[int, L7Policy]],
    peers: Mapping[int, PeerSet],
    egress: bool,
    wildcard_identities: Iterable[int] = (),
    matcher_threshold: int = MATCHER_THRESHOLD,
    authenticated: Mapping[int, str] | None = None,
    authenticated_only: bool = False,
) -> http_rbac_pb2.RBAC:
    """The RBAC filter config for one endpoint, direction and port.

    ``redirects`` are the (peer identity, L7 policy) pairs of the port's
    REDIRECT keys; ``wildcard_identities`` get every request regardless (the
    host override of spec 3.3). No redirect at all denies everything: the
    datapath only redirects what some key allows, so that is never reached
    in a consistent state, and failing closed is the safe answer.
    """
    merged: dict[int, L7Policy] = {}
    for ident, l7 in redirects:
        merged[ident] = merged[ident].merge(l7) if ident in merged else l7
    for ident in wildcard_identities:
        # Unconditional: an identity the kernel does not redirect never reaches Envoy.
        merged[ident] = merged.get(ident, L7Policy("http")).with_wildcard()
    size = sum(
        len(p.include) + len(p.exclude) for i, p in peers.items() if i in merged and i != ANY_IDENTITY
    )
    if authenticated and egress:
        raise InputError("authenticated: applies to ingress only")
    if size > matcher_threshold and not authenticated:
        return _matcher_rbac(merged, peers, egress)
    return _rules_rbac(merged, peers, egress, authenticated or {}, authenticated_only)


def _rules_rbac(
    merged: Mapping[int, L7Policy],
    peers: Mapping[int, PeerSet],
    egress: bool,
    authenticated: Mapping[int, str] | None = None,
    authenticated_only: bool = False,
) -> http_rbac_pb2.RBAC:
    side = _Side(egress)
    policies: dict[str, rbac_pb2.Policy] = {}
    for ident in sorted(merged):
        l7 = merged[ident]
        peer = None if ident == ANY_IDENTITY else side.peers(peers.get(ident))
        spiffe = (authenticated or {}).get(ident)
        if spiffe is not None and peer is not None:
            principal = side.authenticated(spiffe)
            peer = principal if authenticated_only else side.all_of([principal, peer])
        requests = side.requests(l7)
        condition = side.all_of([n for n in (peer, requests) if n is not None])
        name = "id-any" if ident == ANY_IDENTITY else f"id-{ident}"
        if egress:
            policies[name] = rbac_pb2.Policy(
                permissions=[condition], principals=[rbac_pb2.Principal(any=True)]
            )
        else:
            policies[name] = rbac_pb2.Policy(
                permissions=[rbac_pb2.Permission(any=True)], principals=[condition]
            )
    return http_rbac_pb2.RBAC(
        rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies=policies),
        rules_stat_prefix="flagella",
    )


def _policy_name(ident: int) -> str:
    return "id-any" if ident == ANY_IDENTITY else f"id-{ident}"


def _action(name: str, allow: bool) -> matcher_pb2.Matcher.OnMatch:
    action = rbac_pb2.Action(name=name, action=rbac_pb2.RBAC.ALLOW if allow else rbac_pb2.RBAC.DENY)
    typed = xds_extension_pb2.TypedExtensionConfig(name="action")
    typed.typed_config.Pack(action)
    return matcher_pb2.Matcher.OnMatch(action=typed)


def _header_predicate(name: str, value: xds_string_pb2.StringMatcher) -> matcher_pb2.Matcher.MatcherList.Predicate:
    inp = xds_extension_pb2.TypedExtensionConfig(name=f"header {name}")
    inp.typed_config.Pack(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=name))
    return matcher_pb2.Matcher.MatcherList.Predicate(
        single_predicate=matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
            input=inp, value_match=value
        )
    )


def _xds_regex(pattern: str) -> xds_string_pb2.StringMatcher:
    return xds_string_pb2.StringMatcher(
        safe_regex=xds_regex_pb2.RegexMatcher(google_re2=xds_regex_pb2.RegexMatcher.GoogleRE2(), regex=pattern)
    )


def _rule_predicate(rule: HTTPRule) -> matcher_pb2.Matcher.MatcherList.Predicate | None:
    """All of one HTTP rule's conditions; None for a rule that matches everything."""
    parts = []
    for name, pattern in ((":method", rule.method), (":path", rule.path), (":authority", rule.host)):
        if pattern:
            parts.append(_header_predicate(name, _xds_regex(pattern)))
    for spec in rule.headers:
        name, sep, value = spec.partition(" ")
        name = name.rstrip(":").lower()
        match = xds_string_pb2.StringMatcher(exact=value) if sep and value else _xds_regex(".*")
        parts.append(_header_predicate(name, match))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return matcher_pb2.Matcher.MatcherList.Predicate(
        and_matcher=matcher_pb2.Matcher.MatcherList.Predicate.PredicateList(predicate=parts)
    )


def _rules_matcher(
    entries: list[tuple[int, L7Policy]], fallback: matcher_pb2.Matcher.OnMatch | None
) -> matcher_pb2.Matcher:
    """First match wins over the rules of ``entries`` (in order), then ``fallback``."""
    out = matcher_pb2.Matcher()
    for ident, l7 in entries:
        rules = sorted(l7.http, key=lambda r: (r.method, r.path, r.host, r.headers))
        predicates = [_rule_predicate(r) for r in rules]
        if l7.wildcard or any(p is None for p in predicates):
            # Every request passes: nothing after this entry can change the answer.
            out.on_no_match.CopyFrom(_action(_policy_name(ident), True))
            return out
        for predicate in predicates:
            assert predicate is not None
            out.matcher_list.matchers.add(predicate=predicate, on_match=_action(_policy_name(ident), True))
    if fallback is not None:
        out.on_no_match.CopyFrom(fallback)
    return out


def _cidr_xds(net: IPNetwork) -> cidr_pb2.CidrRange:
    return cidr_pb2.CidrRange(
        address_prefix=str(net.network_address), prefix_len=wrappers_pb2.UInt32Value(value=net.prefixlen)
    )


def _matcher_rbac(merged: Mapping[int, L7Policy], peers: Mapping[int, PeerSet], egress: bool) -> http_rbac_pb2.RBAC:
    deny = _action("deny", False)
    any_entries = [(ANY_IDENTITY, merged[ANY_IDENTITY])] if ANY_IDENTITY in merged else []
    any_matcher = _rules_matcher(any_entries, deny)
    ranges = []
    shadowed: set[IPNetwork] = set()
    for ident in sorted(i for i in merged if i != ANY_IDENTITY):
        peer = peers.get(ident)
        if peer is None or not peer.include:
            continue
        own = _rules_matcher([(ident, merged[ident]), *any_entries], deny)
        ranges.append(
            ip_pb2.IPMatcher.IPRangeMatcher(
                ranges=[_cidr_xds(n) for n in peer.include],
                on_match=matcher_pb2.Matcher.OnMatch(matcher=own),
                exclusive=True,
            )
        )
        shadowed.update(peer.exclude)
    owned = {n for p in (peers.get(i) for i in merged if i != ANY_IDENTITY) if p for n in p.include}
    others = sorted(shadowed - owned, key=_net_order)
    if others:
        # More specific prefixes of other identities: longest-prefix match must stop there.
        ranges.append(
            ip_pb2.IPMatcher.IPRangeMatcher(
                ranges=[_cidr_xds(n) for n in others],
                on_match=matcher_pb2.Matcher.OnMatch(matcher=any_matcher),
                exclusive=True,
            )
        )
    tree = ip_pb2.IPMatcher(range_matchers=ranges)
    inp = xds_extension_pb2.TypedExtensionConfig(name="destination-ip" if egress else "direct-source-ip")
    inp.typed_config.Pack(
        network_inputs_pb2.DestinationIPInput() if egress else network_inputs_pb2.DirectSourceIPInput()
    )
    custom = xds_extension_pb2.TypedExtensionConfig(name="ip-trie")
    custom.typed_config.Pack(tree)
    top = matcher_pb2.Matcher(
        matcher_tree=matcher_pb2.Matcher.MatcherTree(input=inp, custom_match=custom),
        on_no_match=matcher_pb2.Matcher.OnMatch(matcher=any_matcher),
    )
    return http_rbac_pb2.RBAC(matcher=top, rules_stat_prefix="flagella")


def local_ingress_rbac(targets: Iterable[tuple[Iterable[IPNetwork], http_rbac_pb2.RBAC]]) -> http_rbac_pb2.RBAC:
    """The second RBAC filter of an egress chain: the ingress HTTP rules of the local
    endpoints that the chain's port reaches.

    The egress proxy's upstream carries mark 0x300 and is never redirected again
    (``flagella.datapath.redirect``), so a request from a pod with egress HTTP rules
    to a pod of the same node with ingress HTTP rules on the same port would meet
    only the first set. This filter applies the second one in the same pass:
    ``targets`` are (destination endpoint's addresses, its ingress RBAC for the
    port). Each of its policies is scoped to those destination addresses
    (``destination_ip`` AND the original permission; principals unchanged, the
    peer is still the source); destinations that are none of them pass. A target
    whose RBAC is in the matcher form cannot be scoped, so requests to it are
    denied (fail closed); `http_rbac` with a high ``matcher_threshold`` gives the
    rules form.
    """
    policies: dict[str, rbac_pb2.Policy] = {}
    local: list[rbac_pb2.Permission] = []
    for i, (nets, rbac) in enumerate(targets):
        dest = [rbac_pb2.Permission(destination_ip=_cidr(n)) for n in nets]
        if not dest:
            continue
        local.extend(dest)
        if not rbac.HasField("rules") or rbac.rules.action != rbac_pb2.RBAC.ALLOW:
            continue
        to_it = rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=dest))
        for name in sorted(rbac.rules.policies):
            policy = rbac.rules.policies[name]
            wanted = rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=list(policy.permissions)))
            policies[f"dst{i}-{name}"] = rbac_pb2.Policy(
                permissions=[rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=[to_it, wanted]))],
                principals=list(policy.principals),
            )
    elsewhere = (
        rbac_pb2.Permission(not_rule=rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=local)))
        if local
        else rbac_pb2.Permission(any=True)
    )
    policies["not-local-l7"] = rbac_pb2.Policy(permissions=[elsewhere], principals=[rbac_pb2.Principal(any=True)])
    return http_rbac_pb2.RBAC(
        rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies=policies),
        rules_stat_prefix="flagella_local_ingress",
    )


__all__ = [
    "MATCHER_THRESHOLD",
    "RBAC_TYPE_URL",
    "PeerSet",
    "header_matchers",
    "http_rbac",
    "local_ingress_rbac",
    "peer_sets",
    "peer_condition",
]
