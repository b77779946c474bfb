"""The policy engine: repository + identities + endpoints, resolved incrementally.

The engine owns the revisioned policy repository, the identity universe
(ids -> labels, plus the addresses and named ports CIDR and egress
named-port rules need) and the local endpoints. Every mutation returns the
ids of the endpoints whose resolved policy it may have changed, and only
those are resolved again:

* a policy added, replaced or deleted affects the endpoints its old and new
  rules select;
* an identity added, removed or relabelled affects the endpoints that use a
  selector whose answer changed (the selector cache reports them), plus
  endpoints whose rules have peers that are not plain selectors (entities,
  CIDRs, requires, named ports), which are cheap to recompute;
* an endpoint added or relabelled affects itself, and through its identity
  everything above.

The engine does no I/O: the agent maps its results onto the datapath.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from flagella.policy.api import LabelSelector, Policy, Rule
from flagella.policy.labels import LabelSet
from flagella.policy.mapstate import Direction
from flagella.policy.resolver import (
    EndpointInfo,
    EndpointPolicy,
    IdentityUniverse,
    IPAddress,
    NamedPorts,
    PolicySettings,
    Resolver,
    rule_has_peer_kinds,
    rule_peer_selectors,
)

PolicyName = tuple[str, str, str]


class PolicyEngine:
    def __init__(self, settings: PolicySettings | None = None) -> None:
        self.settings = settings or PolicySettings()
        self.universe = IdentityUniverse()
        self.resolver = Resolver(self.settings, self.universe)
        self.policies: dict[PolicyName, Policy] = {}
        self.revision = 1
        self.endpoints: dict[int, EndpointInfo] = {}
        self.resolved: dict[int, EndpointPolicy] = {}
        self._rules: list[Rule] | None = None
        # selector -> endpoints whose resolution consulted it
        self._selector_users: dict[LabelSelector, set[int]] = defaultdict(set)
        self._endpoint_selectors: dict[int, set[LabelSelector]] = {}
        self._broad_users: set[int] = set()  # endpoints with entity/CIDR/requires/named peers
        self._selected: dict[int, list[Rule]] = {}
        #: identity -> (addresses, named ports) of its endpoints on other nodes (cluster mode)
        self.remote_extras: dict[int, tuple[frozenset[IPAddress], NamedPorts]] = {}

    # -- rules -------------------------------------------------------------

    @property
    def rules(self) -> list[Rule]:
        if self._rules is None:
            self._rules = [r for p in self.policies.values() for r in p.rules]
        return self._rules

    def upsert_policies(self, policies: Iterable[Policy]) -> tuple[int, set[int]]:
        """Add or replace policies (by kind/namespace/name). Returns (revision, affected)."""
        changed: list[Rule] = []
        for p in policies:
            old = self.policies.get(p.key)
            if old is not None:
                changed.extend(old.rules)
            changed.extend(p.rules)
            self.policies[p.key] = p
        return self._rules_changed(changed)

    def delete_policies(self, keys: Iterable[PolicyName]) -> tuple[int, set[int]]:
        changed: list[Rule] = []
        for key in keys:
            old = self.policies.pop(key, None)
            if old is not None:
                changed.extend(old.rules)
        return self._rules_changed(changed)

    def _rules_changed(self, rules: list[Rule]) -> tuple[int, set[int]]:
        if not rules:
            return self.revision, set()
        self._rules = None
        self.revision += 1
        affected: set[int] = set()
        cache = self.universe.selectors
        selected_ids: set[int] = set()
        for r in rules:
            selected_ids |= cache.select(r.endpoint_selector)
        for ep_id, ep in self.endpoints.items():
            if ep.identity in selected_ids:
                affected.add(ep_id)
        self._resolve(affected)
        return self.revision, affected

    # -- identities ---------------------------------------------------------

    def set_identity(self, ident: int, labels: LabelSet) -> set[int]:
        changed = self.universe.selectors.add_identity(ident, labels)
        self.universe.changed(ident)
        return self._identity_changed(ident, changed)

    def remove_identity(self, ident: int) -> set[int]:
        changed = self.universe.selectors.remove_identity(ident)
        self.universe.set_addresses(ident, frozenset())
        self.universe.named_ports.pop(ident, None)
        self.universe.changed(ident)
        return self._identity_changed(ident, changed)

    def _identity_changed(self, ident: int, selectors: list[LabelSelector]) -> set[int]:
        """Update the keys of ``ident`` in every endpoint that may see it as a peer."""
        affected = set(self._broad_users)
        for sel in selectors:
            affected |= self._selector_users.get(sel, set())
        affected &= self.resolved.keys()
        for ep_id in affected:
            self._update_identity(ep_id, ident)
        return affected

    def _update_identity(self, ep_id: int, ident: int) -> None:
        ep = self.endpoints[ep_id]
        policy = self.resolved[ep_id]
        selected = self._selected[ep_id]
        directions: tuple[Direction, ...] = (Direction.INGRESS, Direction.EGRESS)
        for d in directions:
            state = policy.ingress if d == Direction.INGRESS else policy.egress
            keys = self.resolver.identity_keys(ep, selected, d, ident, state)
            state.replace_identity(ident, keys)

    # -- endpoints ------------------------------------------------------------

    def upsert_endpoint(self, ep: EndpointInfo) -> set[int]:
        """Add an endpoint or change its identity, addresses or named ports."""
        old = self.endpoints.get(ep.id)
        self.endpoints[ep.id] = ep
        affected = {ep.id}
        if self.universe.selectors.labels(ep.identity) != ep.labels:
            affected |= self.set_identity(ep.identity, ep.labels)
        extras_changed = self._refresh_identity_extras(ep.identity)
        if old is not None and old.identity != ep.identity:
            extras_changed |= self._refresh_identity_extras(old.identity)
            if not any(e.identity == old.identity for e in self.endpoints.values()):
                affected |= self.remove_identity(old.identity)
        if extras_changed:
            self.universe.changed()
            for ident in extras_changed:
                affected |= self._identity_changed(ident, [])
        self._resolve({ep.id})
        return affected

    def remove_endpoint(self, ep_id: int) -> set[int]:
        ep = self.endpoints.pop(ep_id, None)
        self.resolved.pop(ep_id, None)
        self._selected.pop(ep_id, None)
        self._forget_users(ep_id)
        if ep is None:
            return set()
        if self._refresh_identity_extras(ep.identity):
            self.universe.changed()
            return self._identity_changed(ep.identity, [])
        return set()

    def set_remote_extras(self, ident: int, addresses: frozenset[IPAddress], named_ports: NamedPorts) -> set[int]:
        """The addresses and named ports of ``ident``'s endpoints on other nodes (an
        ipBlock selects them by address, a named port resolves on them); returns the
        endpoints whose policy changed."""
        if addresses or named_ports:
            self.remote_extras[ident] = (addresses, named_ports)
        else:
            self.remote_extras.pop(ident, None)
        if not self._refresh_identity_extras(ident):
            return set()
        self.universe.changed()
        return self._identity_changed(ident, [])

    def _refresh_identity_extras(self, ident: int) -> set[int]:
        """Recompute an identity's addresses and named ports (its local endpoints' and
        `remote_extras`); return {ident} if they changed."""
        addrs: set[IPAddress] = set()
        named: dict[str, set[tuple[int, int]]] = defaultdict(set)
        remote_addrs, remote_named = self.remote_extras.get(ident, (frozenset(), {}))
        addrs |= remote_addrs
        for name, ports in remote_named.items():
            named[name] |= ports
        for e in self.endpoints.values():
            if e.identity == ident:
                addrs |= e.addresses
                for name, ports in e.named_ports.items():
                    named[name] |= ports
        new_addrs = frozenset(addrs)
        new_named: NamedPorts = {k: frozenset(v) for k, v in named.items()}
        changed = (
            self.universe.addresses.get(ident, frozenset()) != new_addrs
            or dict(self.universe.named_ports.get(ident, {})) != new_named
        )
        if self.universe.addresses.get(ident, frozenset()) != new_addrs:
            self.universe.set_addresses(ident, new_addrs)
        if new_named:
            self.universe.named_ports[ident] = new_named
        else:
            self.universe.named_ports.pop(ident, None)
        return {ident} if changed else set()

    # -- resolution -----------------------------------------------------------

    def resolve_all(self) -> None:
        self._resolve(set(self.endpoints))

    def _resolve(self, ep_ids: Iterable[int]) -> None:
        rules = self.rules
        for ep_id in ep_ids:
            ep = self.endpoints.get(ep_id)
            if ep is None:
                continue
            selected = self.resolver.selecting_rules(ep, rules)
            self._selected[ep_id] = selected
            self.resolved[ep_id] = self.resolver.resolve_selected(ep, selected)
            self._remember_users(ep_id, selected)

    def _remember_users(self, ep_id: int, selected: list[Rule]) -> None:
        self._forget_users(ep_id)
        used: set[LabelSelector] = set()
        broad = False
        for r in selected:
            used.update(rule_peer_selectors(r))
            broad = broad or rule_has_peer_kinds(r)
        for sel in used:
            self._selector_users[sel].add(ep_id)
        self._endpoint_selectors[ep_id] = used
        if broad or self.settings.legacy_host_allows_world:
            self._broad_users.add(ep_id)

    def _forget_users(self, ep_id: int) -> None:
        for sel in self._endpoint_selectors.pop(ep_id, set()):
            users = self._selector_users.get(sel)
            if users is not None:
                users.discard(ep_id)
        self._broad_users.discard(ep_id)

    def policy(self, ep_id: int) -> EndpointPolicy:
        return self.resolved[ep_id]

    def identities(self) -> Mapping[int, LabelSet]:
        return self.universe.selectors.identities
