"""The engine's incremental updates give exactly what a full resolution gives."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagella.policy.api import parse_policy
from flagella.policy.engine import PolicyEngine
from flagella.policy.identities import reserved_identity_labels
from flagella.policy.labels import k8s_labels
from flagella.policy.resolver import EndpointInfo

APPS = ["a", "b"]


def policy_doc(i: int, target: str, peer: str, port: int | None, kind: str) -> dict:
    rule: dict = {"fromEndpoints": [{"matchLabels": {"app": peer}}]}
    if kind == "cidr":
        rule = {"fromCIDRSet": [{"cidr": "10.244.0.0/24", "except": ["10.244.0.128/25"]}]}
    elif kind == "entity":
        rule = {"fromEntities": ["cluster"]}
    elif kind == "requires":
        rule["fromRequires"] = [{"matchLabels": {"app": target}}]
    if port:
        rule["toPorts"] = [{"ports": [{"port": str(port), "protocol": "TCP"}]}]
        if kind == "l7":
            rule["toPorts"][0]["rules"] = {"http": [{"method": "GET"}]}
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": f"p{i}", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": target}}, "ingress": [rule],
                 "egress": [{"toEndpoints": [{"matchLabels": {"app": peer}}]}]},
    }


def cluster_doc(i: int, tier: str, priority: int, target: str, peer: str, action: str,
                port: int | None) -> dict:
    """A ClusterNetworkPolicy: an ``action`` rule for ``peer`` (app, CIDR or any) and a last rule.

    Odd ``i`` governs egress, even ``i`` ingress (which has no CIDR peers: every pod instead).
    """
    to: list = [{"pods": {"podSelector": {"matchLabels": {"app": peer}}}}]
    if peer == "cidr":
        to = [{"networks": ["10.244.0.0/25"]} if i % 2 else {"namespaces": {}}]
    rule: dict = {"action": action}
    if peer != "any":
        rule["to" if i % 2 else "from"] = to
    if port:
        rule["protocols"] = [{"tcp": {"destinationPort": {"number": port}}}]
    last = {"action": "Deny" if action == "Accept" else "Accept"}
    direction = "egress" if i % 2 else "ingress"
    return {
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": f"c{i}"},
        "spec": {"tier": tier, "priority": priority,
                 "subject": {"pods": {"podSelector": {"matchLabels": {"app": target}}}},
                 direction: [rule, last]},
    }


ops = st.lists(
    st.one_of(
        st.tuples(st.just("policy"), st.integers(0, 3), st.sampled_from(APPS), st.sampled_from(APPS),
                  st.sampled_from([None, 80, 443]),
                  st.sampled_from(["sel", "cidr", "entity", "requires", "l7"])),
        st.tuples(st.just("delete"), st.integers(0, 3)),
        st.tuples(st.just("cluster"), st.integers(0, 3), st.sampled_from(["Admin", "Baseline"]),
                  st.integers(0, 2), st.sampled_from(APPS),
                  st.sampled_from([*APPS, "cidr", "any"]),
                  st.sampled_from(["Accept", "Deny", "Pass"]), st.sampled_from([None, 80])),
        st.tuples(st.just("cluster-delete"), st.integers(0, 3)),
        st.tuples(st.just("endpoint"), st.integers(1, 4), st.sampled_from(APPS), st.integers(1, 250)),
        st.tuples(st.just("remove"), st.integers(1, 4)),
    ),
    max_size=12,
)


def labels_id(labels, ids):
    return ids.setdefault(labels, 256 + len(ids))


def fresh(engine: PolicyEngine) -> PolicyEngine:
    other = PolicyEngine(engine.settings)
    for ident, labels in engine.identities().items():
        other.set_identity(ident, labels)
    other.upsert_policies(engine.policies.values())
    for ep in engine.endpoints.values():
        other.upsert_endpoint(ep)
    other.resolve_all()
    return other


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_incremental_equals_full_resolution(operations):
    engine = PolicyEngine()
    for ident, labels in reserved_identity_labels().items():
        engine.set_identity(ident, labels)
    ids: dict = {}
    for op in operations:
        if op[0] == "policy":
            _, i, target, peer, port, kind = op
            engine.upsert_policies([parse_policy(policy_doc(i, target, peer, port, kind))])
        elif op[0] == "delete":
            engine.delete_policies([("CiliumNetworkPolicy", "default", f"p{op[1]}")])
        elif op[0] == "cluster":
            engine.upsert_policies([parse_policy(cluster_doc(*op[1:]))])
        elif op[0] == "cluster-delete":
            engine.delete_policies([("ClusterNetworkPolicy", "", f"c{op[1]}")])
        elif op[0] == "endpoint":
            _, ep_id, app, host = op
            labels = k8s_labels({"app": app}, "default")
            engine.upsert_endpoint(
                EndpointInfo(ep_id, labels_id(labels, ids), labels,
                             addresses=frozenset({ipaddress.ip_address(f"10.244.0.{host}")}))
            )
        else:
            engine.remove_endpoint(op[1])
        expected = fresh(engine)
        assert set(engine.resolved) == set(engine.endpoints)
        for ep_id in engine.endpoints:
            got, want = engine.policy(ep_id), expected.policy(ep_id)
            assert got.ingress == want.ingress, (op, ep_id)
            assert got.egress == want.egress, (op, ep_id)
