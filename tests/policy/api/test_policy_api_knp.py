"""Kubernetes NetworkPolicy -> Cilium rule translation (spec 2, modern fixes)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from flagella.errors import FieldError, PolicyValidationError
from flagella.policy.api import (
    CIDRRule,
    LabelSelector,
    PeerRule,
    PortProtocol,
    PortRule,
    Protocol,
    Requirement,
    parse_policy,
)

NS = "k8s:io.kubernetes.pod.namespace"
NSL = "k8s:io.cilium.k8s.namespace.labels."


def knp(spec: Any, *, name: str = "np", namespace: str = "x") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def rule_of(spec: Any, **kw: Any) -> Any:
    [rule] = parse_policy(knp(spec, **kw)).rules
    return rule


def error_map(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(doc)
    return {e.path: e.reason for e in info.value.errors}


A = {"matchLabels": {"pod": "a"}}


def test_target_and_labels() -> None:
    policy = parse_policy(knp({"podSelector": A, "policyTypes": ["Ingress"]}, name="deny", namespace="y"))
    assert policy.key == ("NetworkPolicy", "y", "deny")
    [rule] = policy.rules
    assert rule.endpoint_selector == LabelSelector(((NS, "y"), ("k8s:pod", "a")))
    assert rule.labels == ("k8s:io.cilium.k8s.policy.derived-from=NetworkPolicy",
                           "k8s:io.cilium.k8s.policy.name=deny",
                           "k8s:io.cilium.k8s.policy.namespace=y")


def test_empty_pod_selector_selects_the_namespace() -> None:
    assert rule_of({"podSelector": {}}).endpoint_selector == LabelSelector(((NS, "x"),))


def test_pod_selector_peer_is_namespaced() -> None:
    rule = rule_of({"podSelector": A, "ingress": [{"from": [{"podSelector": {"matchExpressions": [
        {"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]})
    assert rule.ingress == (PeerRule(selectors=(LabelSelector(
        ((NS, "x"),), (Requirement("k8s:pod", "In", ("b", "c")),)),)),)


def test_namespace_selector_peer() -> None:
    rule = rule_of({"podSelector": A, "ingress": [{"from": [{"namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "y"},
        "matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}]})
    assert rule.ingress[0].selectors == (LabelSelector(
        ((NSL + "kubernetes.io/metadata.name", "y"),),
        (Requirement(NSL + "ns", "NotIn", ("x",)),)),)


def test_empty_namespace_selector_means_all_pods_of_all_namespaces() -> None:
    rule = rule_of({"podSelector": A, "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    assert rule.ingress[0].selectors == (LabelSelector((), (Requirement(NS, "Exists"),)),)


def test_pod_and_namespace_selector_are_anded() -> None:
    rule = rule_of({"podSelector": A, "egress": [{"to": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}},
        {"namespaceSelector": {}, "podSelector": {}},
    ]}], "policyTypes": ["Egress"]})
    assert rule.ingress is None
    assert rule.egress == (PeerRule(selectors=(
        LabelSelector(((NSL + "ns", "y"), ("k8s:pod", "b"))),
        LabelSelector((), (Requirement(NS, "Exists"),)),
    )),)


def test_peers_of_one_rule_are_unioned() -> None:
    rule = rule_of({"podSelector": A, "egress": [{"ports": [{"port": 80, "protocol": "TCP"}], "to": [
        {"podSelector": {}}, {"ipBlock": {"cidr": "192.168.242.213/24", "except": ["192.168.242.0/28"]}}]}]})
    net = ipaddress.ip_network
    assert rule.egress == (PeerRule(
        selectors=(LabelSelector(((NS, "x"),)),),
        cidrs=(CIDRRule(net("192.168.242.0/24"), (net("192.168.242.0/28"),)),),
        ports=(PortRule((PortProtocol(80, Protocol.TCP),)),),
    ),)


@pytest.mark.parametrize("rule", [{}, {"from": []}, {"from": None}])
def test_rule_without_peers_allows_every_peer(rule: dict[str, Any]) -> None:
    assert rule_of({"podSelector": {}, "ingress": [rule]}).ingress == (PeerRule(any_peer=True),)


def test_ports() -> None:
    rule = rule_of({"podSelector": {}, "ingress": [{"ports": [
        {"port": 80}, {"protocol": "UDP"}, {}, {"port": "serve-81-tcp"},
        {"port": 53, "endPort": 84, "protocol": "SCTP"}, {"port": "8080", "protocol": "tcp"}]}]})
    [peer] = rule.ingress
    assert peer.any_peer
    assert peer.ports == tuple(PortRule((p,)) for p in (
        PortProtocol(80, Protocol.TCP), PortProtocol(0, Protocol.UDP), PortProtocol(0, Protocol.TCP),
        PortProtocol(0, Protocol.TCP, name="serve-81-tcp"),
        PortProtocol(53, Protocol.SCTP, end_port=84), PortProtocol(8080, Protocol.TCP)))


def test_port_errors() -> None:
    reasons = error_map(knp({"podSelector": {}, "ingress": [{"ports": [
        {"port": 0}, {"port": "Serve"}, {"port": "web", "endPort": 90}, {"protocol": "ANY"},
        {"port": 90, "endPort": 80}, {"protocol": "TCP", "endPort": 80}]}]}))
    p = "spec.ingress[0].ports"
    assert reasons[f"{p}[0].port"] == "must be 1-65535"
    assert reasons[f"{p}[1].port"].startswith("invalid port name 'Serve'")
    assert reasons[f"{p}[2].endPort"] == "may only be given with a numeric port"
    assert reasons[f"{p}[3].protocol"] == "invalid protocol 'ANY': must be TCP, UDP or SCTP"
    assert reasons[f"{p}[4].endPort"] == "must be between port (90) and 65535"
    assert reasons[f"{p}[5].endPort"] == "may only be given with a numeric port"


def test_peer_errors() -> None:
    reasons = error_map(knp({"podSelector": {}, "ingress": [{"from": [
        {}, {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}},
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8", "11.0.0.0/8"]}},
        {"ipBlock": {"cidr": "10.0.0.1"}}, {"podSelector": {"matchLabels": {"bad key!": "v"}}}]}]}))
    p = "spec.ingress[0].from"
    assert reasons[f"{p}[0]"] == "must specify podSelector, namespaceSelector or ipBlock"
    assert reasons[f"{p}[1]"] == "ipBlock may not be combined with podSelector or namespaceSelector"
    assert reasons[f"{p}[2].ipBlock.except[0]"] == "except 10.0.0.0/8 must be a strict subset of 10.0.0.0/8"
    assert reasons[f"{p}[2].ipBlock.except[1]"] == "except 11.0.0.0/8 is not contained in 10.0.0.0/8"
    assert reasons[f"{p}[3].ipBlock.cidr"].endswith("must be IP/prefix-length")
    assert reasons[f"{p}[4].podSelector.matchLabels.bad key!"].startswith("invalid label key")


def test_long_qualified_namespace_label_keys_are_valid() -> None:
    key = "a" * 253 + "/" + "b" * 63
    rule = rule_of({"podSelector": {}, "egress": [{"to": [{"namespaceSelector": {
        "matchLabels": {key: "selected", "a" * 63: "selected"}}}]}], "policyTypes": ["Egress"]})
    labels = dict(rule.egress[0].selectors[0].match_labels)
    assert labels[NSL + key] == "selected" and labels[NSL + "a" * 63] == "selected"


# --- policyTypes -----------------------------------------------------------------


@pytest.mark.parametrize("spec, ingress, egress", [
    # policyTypes absent: Ingress always, Egress iff there are egress rules.
    ({}, (PeerRule(),), None),
    ({"ingress": []}, (PeerRule(),), None),
    ({"egress": []}, (PeerRule(),), None),
    ({"egress": [{}]}, (PeerRule(),), (PeerRule(any_peer=True),)),
    ({"ingress": [{}]}, (PeerRule(any_peer=True),), None),
    # policyTypes given: exactly those directions.
    ({"policyTypes": ["Ingress"], "ingress": []}, (PeerRule(),), None),
    ({"policyTypes": ["Egress"]}, None, (PeerRule(),)),
    ({"policyTypes": ["Egress", "Ingress"]}, (PeerRule(),), (PeerRule(),)),
    ({"policyTypes": ["Egress"], "ingress": [{}]}, None, (PeerRule(),)),
    ({"policyTypes": ["Ingress", "Egress"], "ingress": [{}]}, (PeerRule(any_peer=True),), (PeerRule(),)),
])
def test_policy_types(spec: dict[str, Any], ingress: Any, egress: Any) -> None:
    rule = rule_of({"podSelector": {}, **spec})
    assert rule.ingress == ingress
    assert rule.egress == egress


def test_ignored_direction_warns() -> None:
    warnings: list[FieldError] = []
    parse_policy(knp({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}), warnings=warnings)
    assert [w.path for w in warnings] == ["spec.ingress"]


def test_spec_errors() -> None:
    reasons = error_map(knp({"ingress": [{"to": []}], "policyTypes": ["Sideways"]}))
    assert reasons["spec.podSelector"].startswith("required")
    assert reasons["spec.ingress[0].to"] == "unknown field"
    assert reasons["spec.policyTypes[0]"].startswith("invalid policy type")
    doc = knp({"podSelector": {}})
    doc["apiVersion"] = "extensions/v1beta1"
    assert "must be networking.k8s.io/v1" in error_map(doc)["apiVersion"]
