"""The pure core: sidecar node ids, SPIFFE principals, the per-workload RBAC config."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flagella.errors import InputError
from flagella.istio.workload import (
    IstioSettings,
    identity_spiffe_ids,
    node_id,
    parse_node,
    workload_rbac,
)
from flagella.policy.api import load_policies
from flagella.policy.engine import PolicyEngine
from flagella.policy.labels import k8s_labels
from flagella.policy.resolver import EndpointInfo, PolicySettings
from flagella.proxy.rbac import peer_sets

NODE = "sidecar~10.244.1.7~leia-7d4b9.default~default.svc.cluster.local"


def test_parse_stock_sidecar_node() -> None:
    node = parse_node(NODE, {"NAMESPACE": "default", "NAME": "leia-7d4b9", "INSTANCE_IPS": "10.244.1.7,fd00:10:244::7",
                             "SERVICE_ACCOUNT": "leia", "LABELS": {"app": "leia"}})
    assert (str(node.pod_ip), node.pod, node.namespace, node.service_account) == ("10.244.1.7", "leia-7d4b9", "default", "leia")
    assert [str(a) for a in node.instance_ips] == ["10.244.1.7", "fd00:10:244::7"]
    assert node_id("leia-7d4b9", "default", ipaddress.ip_address("10.244.1.7")) == NODE


@pytest.mark.parametrize(
    ("node", "metadata", "field"),
    [
        ("router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local", {}, "node.id"),
        ("sidecar~10.244.1.999~a.default~default.svc.cluster.local", {}, "node.id (pod IP)"),
        ("sidecar~10.244.1.7~nonamespace~default.svc.cluster.local", {}, "node.id"),
        ("sidecar~10.244.1.7~a.default~other.svc.cluster.local", {}, "node.id"),
        (NODE, {"NAMESPACE": "other"}, "node.metadata.NAMESPACE"),
        (NODE, {"NAME": "luke"}, "node.metadata.NAME"),
        (NODE, {"INSTANCE_IPS": "10.244.1.8"}, "node.metadata.INSTANCE_IPS"),
        (NODE, {"INSTANCE_IPS": ["10.244.1.7"]}, "node.metadata.INSTANCE_IPS"),
        (NODE, {"SERVICE_ACCOUNT": "Bad/SA"}, "node.metadata.SERVICE_ACCOUNT"),
        (NODE, {"LABELS": {"app": 1}}, "node.metadata.LABELS"),
    ],
)
def test_bad_nodes_name_the_field(node: str, metadata: dict, field: str) -> None:
    with pytest.raises(InputError, match=f"^{field.replace('(', '.').replace(')', '.')}"):
        parse_node(node, metadata)


@given(st.text(max_size=80), st.dictionaries(st.sampled_from(["NAMESPACE", "NAME", "INSTANCE_IPS", "SERVICE_ACCOUNT", "LABELS"]),
                                             st.one_of(st.text(max_size=20), st.integers(), st.none())))
def test_parse_node_fuzz_only_input_errors(node: str, metadata: dict) -> None:
    try:
        parsed = parse_node(node, metadata)
    except InputError:
        return
    assert node_id(parsed.pod, parsed.namespace, parsed.pod_ip).split("~")[:3] == node.split("~")[:3]


def test_trust_domain_validated() -> None:
    with pytest.raises(InputError, match="istio.trust_domain"):
        IstioSettings(trust_domain="a/b")


def test_spiffe_only_for_service_account_identities() -> None:
    ids = identity_spiffe_ids(
        {300: k8s_labels({"app": "luke"}, "rebels", service_account="luke"), 301: k8s_labels({"app": "x"}, "default")},
        "example.org",
    )
    assert ids == {300: "spiffe://example.org/ns/rebels/sa/luke"}


def test_config_per_port_and_other_ports_pass() -> None:
    engine = PolicyEngine(PolicySettings())
    engine.upsert_policies(load_policies("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: leia}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: luke}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}]}
  - fromEndpoints: [{matchLabels: {app: luke}}]
    toPorts: [{ports: [{port: "9090", protocol: TCP}]}]
"""))
    idents = {300: k8s_labels({"app": "luke"}, "default", service_account="luke"), 256: k8s_labels({"app": "leia"}, "default")}
    for i, ls in idents.items():
        engine.set_identity(i, ls)
    engine.upsert_endpoint(EndpointInfo(1, 256, idents[256]))
    cfg = workload_rbac(engine.policy(1).ingress, peer_sets({ipaddress.ip_network("10.244.1.2/32"): 300}), idents,
                        IstioSettings())
    assert set(cfg.rules.policies) == {"port-80/id-300", "other-ports"}
    p80 = cfg.rules.policies["port-80/id-300"]
    assert p80.permissions[0].and_rules.rules[0].destination_port == 80
    principal = p80.principals[0].and_ids.ids[0]  # (peer AND request rules): the peer part
    assert principal.and_ids.ids[0].authenticated.principal_name.exact == "spiffe://cluster.local/ns/default/sa/luke"
    assert principal.and_ids.ids[1].direct_remote_ip.address_prefix == "10.244.1.2"
    other = cfg.rules.policies["other-ports"].permissions[0]
    assert [r.destination_port for r in other.not_rule.or_rules.rules] == [80]
    only = workload_rbac(engine.policy(1).ingress, peer_sets({ipaddress.ip_network("10.244.1.2/32"): 300}), idents,
                         IstioSettings(authenticated_only=True))
    assert only.rules.policies["port-80/id-300"].principals[0].and_ids.ids[0].authenticated.principal_name.exact.endswith("/sa/luke")
