"""CiliumNetworkPolicy / CCNP translation and validation (spec 1)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from flagella.errors import FieldError, PolicyValidationError
from flagella.policy.api import (
    KAFKA_API_KEYS,
    KAFKA_ROLES,
    RE2_MAX_PROGRAM_SIZE,
    CIDRRule,
    HTTPRule,
    ICMPField,
    KafkaRule,
    LabelSelector,
    PeerRule,
    Policy,
    PortProtocol,
    PortRule,
    Protocol,
    Requirement,
    parse_policy,
)

NS = "k8s:io.kubernetes.pod.namespace"


def cnp(spec: Any = None, *, specs: Any = None, name: str = "p", namespace: str | None = "default",
        kind: str = "CiliumNetworkPolicy") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    doc: dict[str, Any] = {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta}
    if spec is not None:
        doc["spec"] = spec
    if specs is not None:
        doc["specs"] = specs
    return doc


def ccnp(spec: Any) -> dict[str, Any]:
    return cnp(spec, namespace=None, kind="CiliumClusterwideNetworkPolicy")


def one_rule(doc: dict[str, Any]) -> Any:
    policy = parse_policy(doc)
    assert len(policy.rules) == 1
    return policy.rules[0]


def egress_of(policy: Policy) -> tuple[PeerRule, ...]:
    egress = policy.rules[0].egress
    assert egress is not None
    return egress


def errors_of(doc: dict[str, Any]) -> list[FieldError]:
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(doc, "test.yaml#1")
    return info.value.errors


def error_map(doc: dict[str, Any]) -> dict[str, str]:
    return {e.path: e.reason for e in errors_of(doc)}


def ingress(*rules: Any, selector: Any = None) -> dict[str, Any]:
    return {"endpointSelector": selector if selector is not None else {"matchLabels": {"app": "x"}},
            "ingress": list(rules)}


def egress(*rules: Any) -> dict[str, Any]:
    return {"endpointSelector": {"matchLabels": {"app": "x"}}, "egress": list(rules)}


def tcp(port: str, **extra: Any) -> dict[str, Any]:
    """``toPorts`` with one TCP port; ``extra`` goes into the PortRule."""
    return {"toPorts": [{"ports": [{"port": port, "protocol": "TCP"}], **extra}]}


# --- envelope --------------------------------------------------------------


def test_policy_identity_and_origin_labels() -> None:
    doc = cnp({"endpointSelector": {}, "description": "hello"}, name="rule1", namespace="prod")
    policy = parse_policy(doc)
    assert isinstance(policy, Policy)
    assert policy.key == ("CiliumNetworkPolicy", "prod", "rule1")
    assert policy.source == doc
    rule = policy.rules[0]
    assert rule.description == "hello"
    assert rule.labels == (
        "k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy",
        "k8s:io.cilium.k8s.policy.name=rule1",
        "k8s:io.cilium.k8s.policy.namespace=prod",
    )
    assert rule.ingress is None and rule.egress is None
    assert rule.ingress_deny is None and rule.egress_deny is None


def test_empty_namespace_is_default() -> None:
    policy = parse_policy(cnp({"endpointSelector": {}}, namespace=""))
    assert policy.namespace == "default"
    assert policy.rules[0].endpoint_selector == LabelSelector(((NS, "default"),))


def test_rule_labels_are_appended() -> None:
    rule = one_rule(cnp({"endpointSelector": {}, "labels": [
        {"key": "team", "value": "a", "source": "k8s"}, {"key": "x"}, "any:y=z"]}))
    assert rule.labels[-3:] == ("k8s:team=a", "unspec:x=", "any:y=z")


def test_spec_and_specs_are_concatenated() -> None:
    policy = parse_policy(cnp({"endpointSelector": {"matchLabels": {"a": "1"}}},
                              specs=[{"endpointSelector": {"matchLabels": {"b": "2"}}},
                                     {"endpointSelector": {"matchLabels": {"c": "3"}}}]))
    keys = [r.endpoint_selector.match_labels[0][0] for r in policy.rules]
    assert keys == ["any:a", "any:b", "any:c"]


@pytest.mark.parametrize("doc, path, reason", [
    (cnp(), "spec", "required: a CiliumNetworkPolicy must have spec or a non-empty specs"),
    (cnp(specs=[]), "spec", "required: a CiliumNetworkPolicy must have spec or a non-empty specs"),
    (cnp({"endpointSelector": {}}, name=""), "metadata.name", "required: a policy must have a name"),
    (cnp({"ingress": []}), "spec.endpointSelector", "required: a rule must have an endpointSelector"),
    (cnp({"nodeSelector": {}}), "spec.nodeSelector", "nodeSelector (host policies) is not supported"),
])
def test_envelope_errors(doc: dict[str, Any], path: str, reason: str) -> None:
    assert error_map(doc)[path] == reason


def test_error_carries_document_label() -> None:
    [error] = errors_of(cnp({"endpointSelector": {}, "bogus": 1}, name="rule1"))
    assert error.document == "test.yaml#1 (CiliumNetworkPolicy default/rule1)"
    assert error.path == "spec.bogus"
    assert str(error) == "test.yaml#1 (CiliumNetworkPolicy default/rule1): spec.bogus: unknown field"


def test_unknown_kind_and_api_version() -> None:
    assert "unsupported kind" in error_map({"kind": "Pod", "metadata": {"name": "x"}})["kind"]
    doc = cnp({"endpointSelector": {}})
    doc["apiVersion"] = "cilium.io/v1"
    assert "must be cilium.io/v2" in error_map(doc)["apiVersion"]


def test_top_level_description_and_status_are_accepted() -> None:
    doc = cnp({"endpointSelector": {}})
    doc["description"] = "old CRD layout"
    doc["status"] = {"nodes": {}}
    parse_policy(doc)


# --- case-insensitive keys ------------------------------------------------


def test_keys_match_case_insensitively() -> None:
    doc = cnp({"EndpointSelector": {"MatchLabels": {"app": "x"}}, "INGRESS": [{
        "FromEndpoints": [{"matchlabels": {"org": "empire"}}],
        "toports": [{"PORTS": [{"Port": "80", "Protocol": "tcp"}],
                     "Rules": {"HTTP": [{"Method": "GET", "PATH": "/v1/"}]}}]}]})
    rule = one_rule(doc)
    assert rule.endpoint_selector.match_labels == (("any:app", "x"), (NS, "default"))
    [peer] = rule.ingress
    [port_rule] = peer.ports
    assert port_rule.ports == (PortProtocol(80, Protocol.TCP),)
    assert port_rule.rules is not None
    assert port_rule.rules.http == (HTTPRule(method="GET", path="/v1/"),)


def test_two_spellings_of_one_field_are_an_error() -> None:
    reasons = error_map(cnp({"endpointSelector": {}, "ingress": [], "Ingress": []}))
    assert reasons["spec.Ingress"] == "duplicate field (also given as 'ingress')"


def test_unknown_field_suggests_the_right_one() -> None:
    reasons = error_map(cnp(ingress({"fromEndpoints": [{}], "toPort": []})))
    assert reasons["spec.ingress[0].toPort"] == "unknown field (did you mean 'toPorts'?)"


# --- label sources --------------------------------------------------------


@pytest.mark.parametrize("key, expected", [
    ("org", "any:org"),
    ("k8s:app", "k8s:app"),
    ("reserved:init", "reserved:init"),
    ("$host", "reserved:host"),
    ("reserved.world", "reserved:world"),
    ("any:org", "any:org"),
    ("container:foo", "container:foo"),
    ("cidr:10.0.0.0/8", "cidr:10.0.0.0/8"),
    ("foo:bar", "any:foo:bar"),
    ("k8s.app", "any:k8s.app"),
    ("io.kubernetes.pod.namespace", NS),
    ("any:io.kubernetes.pod.namespace", NS),
])
def test_selector_key_sources(key: str, expected: str) -> None:
    rule = one_rule(ccnp({"endpointSelector": {"matchLabels": {key: "v"}}}))
    assert rule.endpoint_selector.match_labels == ((expected, "v"),)


def test_match_labels_sorted_and_operators_normalized() -> None:
    rule = one_rule(ccnp({"endpointSelector": {
        "matchLabels": {"zeta": "1", "alpha": "2"},
        "matchExpressions": [{"key": "k8s:tier", "operator": "in", "values": ["a", "b"]},
                             {"key": "env", "operator": "DOESNOTEXIST"}]}}))
    sel = rule.endpoint_selector
    assert sel.match_labels == (("any:alpha", "2"), ("any:zeta", "1"))
    assert sel.match_expressions == (Requirement("k8s:tier", "In", ("a", "b")),
                                     Requirement("any:env", "DoesNotExist"))


def test_selector_errors() -> None:
    reasons = error_map(cnp({"endpointSelector": {
        "matchLabels": {"app": 5, "ok": "bad value!", "k8s:": "x"},
        "matchExpressions": [{"key": "a", "operator": "Near"}, {"key": "b", "operator": "In"},
                             {"key": "c", "operator": "Exists", "values": ["x"]}, {"operator": "In"}]}}))
    assert reasons["spec.endpointSelector.matchLabels.app"].startswith("label value must be a string")
    assert reasons["spec.endpointSelector.matchLabels.ok"].startswith("invalid label value")
    assert reasons["spec.endpointSelector.matchLabels.k8s:"] == "label key 'k8s:' has an empty name"
    assert reasons["spec.endpointSelector.matchExpressions[0].operator"].startswith("unknown operator")
    assert reasons["spec.endpointSelector.matchExpressions[1].values"] == "must be non-empty for operator In"
    assert reasons["spec.endpointSelector.matchExpressions[2].values"] == "must be empty for operator Exists"
    assert reasons["spec.endpointSelector.matchExpressions[3].key"] == "required"


def test_same_label_key_twice_after_normalization() -> None:
    reasons = error_map(cnp({"endpointSelector": {"matchLabels": {"app": "a", "any:app": "b"}}}))
    assert "duplicate label key 'any:app'" in reasons["spec.endpointSelector.matchLabels.any:app"]


# --- namespace scoping (spec 1.6) -------------------------------------------


def test_endpoint_selector_gets_the_namespace() -> None:
    rule = one_rule(cnp({"endpointSelector": {}}, namespace="ns1"))
    assert rule.endpoint_selector == LabelSelector(((NS, "ns1"),))


def test_endpoint_selector_namespace_is_replaced() -> None:
    warnings: list[FieldError] = []
    policy = parse_policy(cnp({"endpointSelector": {"matchLabels": {
        "io.kubernetes.pod.namespace": "other", "app": "x"}}}, namespace="ns1"), warnings=warnings)
    assert policy.rules[0].endpoint_selector.match_labels == (("any:app", "x"), (NS, "ns1"))
    assert [w.path for w in warnings] == ["spec.endpointSelector"]


def test_init_endpoint_selector_is_not_namespaced() -> None:
    rule = one_rule(cnp({"endpointSelector": {"matchLabels": {"reserved:init": ""}},
                         "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "a"}}]}]}))
    assert rule.endpoint_selector.match_labels == (("reserved:init", ""),)
    assert rule.ingress[0].selectors == (LabelSelector((("any:app", "a"),)),)


def test_peer_selectors_are_namespaced() -> None:
    rule = one_rule(cnp(ingress({"fromEndpoints": [{}, {"matchLabels": {"app": "a"}}],
                                 "fromRequires": [{"matchLabels": {"env": "prod"}}]}),
                        namespace="ns1"))
    [peer] = rule.ingress
    assert peer.selectors == (LabelSelector(((NS, "ns1"),)),
                              LabelSelector((("any:app", "a"), (NS, "ns1"))))
    assert peer.requires == (LabelSelector((("any:env", "prod"), (NS, "ns1"))),)


@pytest.mark.parametrize("selector", [
    {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system"}},
    {"matchLabels": {"io.kubernetes.pod.namespace": "kube-system"}},
    {"matchLabels": {"any:io.kubernetes.pod.namespace": "kube-system"}},
    {"matchExpressions": [{"key": "k8s:io.kubernetes.pod.namespace", "operator": "In",
                           "values": ["kube-system"]}]},
])
def test_peer_with_namespace_is_kept(selector: dict[str, Any]) -> None:
    rule = one_rule(cnp(egress({"toEndpoints": [selector]})))
    [sel] = rule.egress[0].selectors
    assert (NS, "default") not in sel.match_labels
    assert len(sel.match_labels) + len(sel.match_expressions) == 1


def test_reserved_peer_is_not_namespaced_but_requires_is() -> None:
    rule = one_rule(cnp(ingress({"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}],
                                 "fromRequires": [{"matchLabels": {"reserved:host": ""}}]})))
    assert rule.ingress[0].selectors == (LabelSelector((("reserved:host", ""),)),)
    assert rule.ingress[0].requires == (LabelSelector(((NS, "default"), ("reserved:host", ""))),)


def test_clusterwide_policy_is_not_namespaced_and_peers_are_pods() -> None:
    policy = parse_policy(ccnp({"endpointSelector": {},
                                "ingress": [{"fromEndpoints": [{}]}],
                                "egress": [{"toEndpoints": [{"matchLabels": {"reserved:world": ""}}]}]}))
    assert policy.namespace == ""
    rule: Any = policy.rules[0]
    assert rule.endpoint_selector.is_wildcard
    assert rule.ingress[0].selectors == (LabelSelector((), (Requirement(NS, "Exists"),)),)
    assert rule.egress[0].selectors == (LabelSelector((("reserved:world", ""),)),)
    assert "k8s:io.cilium.k8s.policy.derived-from=CiliumClusterwideNetworkPolicy" in rule.labels
    assert not any(label.startswith("k8s:io.cilium.k8s.policy.namespace") for label in rule.labels)


def test_clusterwide_namespace_is_ignored_with_a_warning() -> None:
    doc = ccnp({"endpointSelector": {}})
    doc["metadata"]["namespace"] = "x"
    warnings: list[FieldError] = []
    assert parse_policy(doc, warnings=warnings).namespace == ""
    assert [w.path for w in warnings] == ["metadata.namespace"]


# --- peers ------------------------------------------------------------------


def test_empty_rule_selects_nothing() -> None:
    rule = one_rule(cnp(ingress({})))
    assert rule.ingress == (PeerRule(),)


def test_explicitly_empty_endpoints_select_nothing_even_with_ports() -> None:
    rule = one_rule(cnp(ingress({"fromEndpoints": []}, {"fromEndpoints": [], **tcp("80")})))
    assert rule.ingress[0] == PeerRule()
    assert not rule.ingress[1].any_peer and rule.ingress[1].selectors == ()


def test_ports_without_l3_mean_any_peer() -> None:
    rule = one_rule(cnp(ingress(tcp("80"))))
    [peer] = rule.ingress
    assert peer.any_peer
    assert peer.ports == (PortRule((PortProtocol(80, Protocol.TCP),)),)


def test_requires_is_not_an_l3_member() -> None:
    rule = one_rule(cnp(ingress({"fromRequires": [{"matchLabels": {"env": "prod"}}], **tcp("80")})))
    assert rule.ingress[0].any_peer


def test_icmps_without_l3_mean_any_peer() -> None:
    rule = one_rule(cnp(egress({"icmps": [{"fields": [
        {"type": 8}, {"type": "EchoRequest", "family": "IPv6"}, {"type": "DestinationUnreachable"},
        {"type": "0"}]}]})))
    [peer] = rule.egress
    assert peer.any_peer
    assert peer.icmps == (ICMPField(8), ICMPField(128, "IPv6"), ICMPField(3), ICMPField(0))


def test_icmp_errors() -> None:
    reasons = error_map(cnp(egress({"icmps": [{"fields": [
        {"type": 256}, {"type": "PacketTooBig"}, {"family": "IPv6"}, {"type": 1, "family": "ipx"}]},
        {}]})))
    assert reasons["spec.egress[0].icmps[0].fields[0].type"] == "must be 0-255"
    assert reasons["spec.egress[0].icmps[0].fields[1].type"] == "ICMP type PacketTooBig not found in IPv4"
    assert reasons["spec.egress[0].icmps[0].fields[2].type"] == "required"
    assert reasons["spec.egress[0].icmps[0].fields[3].family"].startswith("invalid family")
    assert reasons["spec.egress[0].icmps[1].fields"] == "at least one ICMP field is required"


def test_entities_are_lower_cased_and_validated() -> None:
    rule = one_rule(cnp(egress({"toEntities": ["World", "kube-apiserver", "remote-node"]})))
    assert rule.egress[0].entities == ("world", "kube-apiserver", "remote-node")
    reasons = error_map(cnp(egress({"toEntities": ["galaxy"]})))
    assert reasons["spec.egress[0].toEntities[0]"] == "unsupported entity: galaxy"


def test_cidrs() -> None:
    rule = one_rule(cnp(egress({
        "toCIDR": ["10.0.0.1", "10.0.0.1/8", "2001:db8::1", "192.168.0.0/16"],
        "toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.96.0.0/12", "10.0.0.5"]}]})))
    net = ipaddress.ip_network
    assert rule.egress[0].cidrs == (
        CIDRRule(net("10.0.0.1/32")), CIDRRule(net("10.0.0.0/8")), CIDRRule(net("2001:db8::1/128")),
        CIDRRule(net("192.168.0.0/16")),
        CIDRRule(net("10.0.0.0/8"), (net("10.96.0.0/12"), net("10.0.0.5/32"))),
    )


def test_cidr_errors() -> None:
    reasons = error_map(cnp(ingress({
        "fromCIDR": ["10.0.0.0/33", "nope", "10.0.0.0/255.0.0.0"],
        "fromCIDRSet": [{"cidr": "10.0.0.1"},
                        {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16", "2001:db8::/64", "10.0.0.0/4"]},
                        {"except": []}]})))
    p = "spec.ingress[0]."
    assert reasons[p + "fromCIDR[0]"].startswith("invalid CIDR '10.0.0.0/33'")
    assert reasons[p + "fromCIDR[1]"].startswith("invalid CIDR 'nope'")
    assert reasons[p + "fromCIDR[2]"].startswith("invalid CIDR")
    assert reasons[p + "fromCIDRSet[0].cidr"] == "invalid CIDR '10.0.0.1': must be IP/prefix-length"
    assert reasons[p + "fromCIDRSet[1].except[0]"] == "except 11.0.0.0/16 is not contained in 10.0.0.0/8"
    assert reasons[p + "fromCIDRSet[1].except[1]"].endswith("is not in the address family of 10.0.0.0/8")
    assert reasons[p + "fromCIDRSet[1].except[2]"] == "except 0.0.0.0/4 is not contained in 10.0.0.0/8"
    assert reasons[p + "fromCIDRSet[2]"] == "exactly one of cidr and cidrGroupRef is required"


def test_combining_l3_members_and_cidr_with_ports_is_allowed() -> None:
    rule = one_rule(cnp(ingress({"fromEndpoints": [{}], "fromCIDR": ["1.1.1.1"],
                                 "fromEntities": ["host"], **tcp("443")})))
    [peer] = rule.ingress
    assert len(peer.selectors) == 1 and len(peer.cidrs) == 1 and peer.entities == ("host",)
    assert not peer.any_peer and len(peer.ports) == 1


def test_other_direction_peer_field_is_ignored_with_a_warning() -> None:
    warnings: list[FieldError] = []
    policy = parse_policy(cnp(egress({"fromEndpoints": [{"matchLabels": {"app": "zook"}}],
                                      **tcp("2181")})), warnings=warnings)
    [peer] = egress_of(policy)
    assert peer.any_peer and peer.selectors == ()
    assert [w.path for w in warnings] == ["spec.egress[0].fromEndpoints"]


def test_unresolvable_peers_allow_nothing_with_a_warning() -> None:
    warnings: list[FieldError] = []
    policy = parse_policy(cnp(egress(
        {"toFQDNs": [{"matchName": "example.com"}], **tcp("443")},
        {"toServices": [{"k8sService": {"serviceName": "s", "namespace": "n"}}]},
        {"toCIDRSet": [{"cidrGroupRef": "group-1"}], **tcp("80")},
        {"toNodes": [{"matchLabels": {"node": "a"}}]},
    )), warnings=warnings)
    for peer in egress_of(policy):
        assert not peer.any_peer
        assert peer.selectors == () and peer.cidrs == () and peer.entities == ()
    assert len(warnings) == 4


def test_unresolvable_peers_in_deny_rules_are_errors() -> None:
    reasons = error_map(cnp({"endpointSelector": {}, "egressDeny": [
        {"toServices": [{"k8sService": {"serviceName": "s"}}]}]}))
    assert "cannot be enforced in a deny rule" in reasons["spec.egressDeny[0].toServices"]


def test_authentication() -> None:
    one_rule(cnp(ingress({"fromEndpoints": [{}], "authentication": {"mode": "disabled"}})))
    reasons = error_map(cnp(ingress({"fromEndpoints": [{}], "authentication": {"mode": "required"}})))
    assert reasons["spec.ingress[0].authentication.mode"] == "authentication mode 'required' is not supported"


# --- ports --------------------------------------------------------------------


def test_port_forms() -> None:
    rule = one_rule(cnp(ingress({"toPorts": [{"ports": [
        {"port": "80"}, {"port": "0", "protocol": "udp"}, {"port": "8080", "endPort": 8090, "protocol": "TCP"},
        {"port": "http-alt", "protocol": "TCP"}, {"port": "Metrics"}, {"port": 53, "protocol": "SCTP"},
        {"port": "443", "endPort": 443}, {"port": "22", "protocol": ""}]}]})))
    assert rule.ingress[0].ports[0].ports == (
        PortProtocol(80, Protocol.ANY),
        PortProtocol(0, Protocol.UDP),
        PortProtocol(8080, Protocol.TCP, end_port=8090),
        PortProtocol(0, Protocol.TCP, name="http-alt"),
        PortProtocol(0, Protocol.ANY, name="metrics"),
        PortProtocol(53, Protocol.SCTP),
        PortProtocol(443, Protocol.ANY),
        PortProtocol(22, Protocol.ANY),
    )


def test_port_errors() -> None:
    doc = cnp(None, specs=[ingress({}), ingress({}, {"toPorts": [{"ports": [
        {"port": "65536"}, {"port": "http_x"}, {"port": "80", "protocol": "ICMP"},
        {"port": "80", "endPort": 79}, {"port": "web", "endPort": 90}, {"protocol": "TCP"},
        {"port": True}, {"port": "0", "endPort": 10}, {"port": "80", "endPort": "90"},
        {"port": "a-very-long-port-name"}]}]})])
    reasons = error_map(doc)
    p = "specs[1].ingress[1].toPorts[0].ports"
    assert reasons[f"{p}[0].port"] == "must be 0-65535"
    assert reasons[f"{p}[1].port"].startswith("invalid port 'http_x'")
    assert reasons[f"{p}[2].protocol"] == "invalid protocol 'ICMP': must be TCP, UDP, SCTP or ANY"
    assert reasons[f"{p}[3].endPort"] == "must be between port (80) and 65535"
    assert reasons[f"{p}[4].endPort"] == "a port range needs a numeric port, not a port name"
    assert reasons[f"{p}[5].port"] == 'must specify a port ("0" for every port)'
    assert reasons[f"{p}[6].port"] == "must be a string, not boolean"
    assert reasons[f"{p}[7].endPort"] == "a port range needs a non-zero port"
    assert reasons[f"{p}[8].endPort"] == "must be an integer, not string"
    assert reasons[f"{p}[9].port"].startswith("invalid port")


def test_at_most_40_ports() -> None:
    ports = [{"port": str(1000 + i)} for i in range(41)]
    reasons = error_map(cnp(ingress({"toPorts": [{"ports": ports}]})))
    assert reasons == {"spec.ingress[0].toPorts[0].ports": "too many ports (41), the max is 40"}


# --- L7 -------------------------------------------------------------------------


def test_http_rules() -> None:
    rule = one_rule(cnp(ingress({"fromEndpoints": [{}], "toPorts": [{
        "ports": [{"port": "80", "protocol": "TCP"}],
        "rules": {"http": [{"method": "GET", "path": "/public"},
                           {"method": "PUT", "path": "/path2$", "host": "foo\\.com",
                            "headers": ["X-My-Header: true"],
                            "headerMatches": [{"name": "X-Token", "value": "abc"}, {"name": "X-Present"}]},
                           {}]}}]})))
    rules = rule.ingress[0].ports[0].rules
    assert rules is not None and rules.parser == "http"
    assert rules.http == (
        HTTPRule(method="GET", path="/public"),
        HTTPRule(method="PUT", path="/path2$", host="foo\\.com",
                 headers=("X-My-Header: true", "X-Token: abc", "X-Present")),
        HTTPRule(),
    )


def test_empty_l7_list_is_no_l7() -> None:
    rule = one_rule(cnp(ingress({"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": []}}]})))
    assert rule.ingress[0].ports[0].rules is None


def test_l7_requires_tcp() -> None:
    reasons = error_map(cnp(ingress(
        {"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]},
        {"toPorts": [{"ports": [{"port": "80", "protocol": "UDP"}], "rules": {"kafka": [{}]}}]},
        {"toPorts": [{"ports": [{"port": "0", "protocol": "TCP"}], "rules": {"http": [{}]}}]},
    )))
    assert reasons["spec.ingress[0].toPorts[0].ports[0].protocol"] == \
        "L7 rules can only apply exclusively to TCP, not ANY"
    assert reasons["spec.ingress[1].toPorts[0].ports[0].protocol"] == \
        "L7 rules can only apply exclusively to TCP, not UDP"
    assert reasons["spec.ingress[2].toPorts[0].ports[0].port"] == "L7 rules can not be used when a port is 0"


def test_one_l7_type_per_port_rule() -> None:
    reasons = error_map(cnp(ingress(tcp("80", rules={"http": [{}], "kafka": [{}]}))))
    assert reasons["spec.ingress[0].toPorts[0].rules"] == \
        "multiple L7 protocol rule types specified in single rule: http, kafka"


def test_http_regex_must_compile() -> None:
    reasons = error_map(cnp(ingress(tcp("80", rules={"http": [{"path": "/a(", "method": "[", "host": "*"}]}))))
    base = "spec.ingress[0].toPorts[0].rules.http[0]"
    assert reasons[f"{base}.path"].startswith("not a valid RE2 regex: missing )")
    assert reasons[f"{base}.path"].endswith("(pattern '/a(')")
    assert reasons[f"{base}.method"].startswith("not a valid RE2 regex")
    assert reasons[f"{base}.host"].startswith("not a valid RE2 regex")


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"/(a)\1", "invalid escape sequence: \\1"),
        ("/(?=admin)", "invalid perl operator: (?="),
        ("/(?!admin).*", "invalid perl operator: (?!"),
        ("/x(?<=x)", "invalid perl operator: (?<"),
        ("/a{1001}", "invalid repetition size: {1001}"),
        ("/[a-z]{1,600}", f"program size 1204 exceeds the limit of {RE2_MAX_PROGRAM_SIZE}"),
    ],
)
def test_http_regex_must_be_re2(pattern: str, reason: str) -> None:
    """Python's re accepts all of these; RE2 (Envoy's safe_regex) does not, so neither do we."""
    re.compile(pattern)
    reasons = error_map(cnp(ingress(tcp("80", rules={"http": [{"path": "/ok", "method": pattern}]}))))
    base = "spec.ingress[0].toPorts[0].rules.http[0]"
    assert f"{base}.path" not in reasons
    assert reasons[f"{base}.method"].startswith(f"not a valid RE2 regex: {reason}")


def test_kafka_rules_expand_roles_and_keys() -> None:
    rule = one_rule(cnp(ingress(tcp("9092", rules={"kafka": [
        {"role": "produce", "topic": "deathstar-plans"},
        {"role": "CONSUME", "topic": "empire-announce", "clientID": "c1"},
        {"apiKey": "ApiVersions"},
        {"apiKey": "fetch", "apiVersion": "2"},
        {},
    ]}))))
    rules = rule.ingress[0].ports[0].rules
    assert rules is not None and rules.parser == "kafka"
    assert rules.kafka == (
        KafkaRule(api_keys=KAFKA_ROLES["produce"], topic="deathstar-plans"),
        KafkaRule(api_keys=KAFKA_ROLES["consume"], topic="empire-announce", client_id="c1"),
        KafkaRule(api_keys=frozenset({18})),
        KafkaRule(api_keys=frozenset({1}), api_version=2),
        KafkaRule(),
    )


def test_kafka_errors() -> None:
    reasons = error_map(cnp(ingress(tcp("9092", rules={"kafka": [
        {"role": "produce", "apiKey": "fetch"},
        {"apiKey": "alterreplicalogdirs"},
        {"role": "admin"},
        {"apiVersion": "40000"},
        {"apiVersion": "v1"},
        {"topic": "a" * 256},
        {"topic": "bad topic"},
    ]}))))
    base = "spec.ingress[0].toPorts[0].rules.kafka"
    assert reasons[f"{base}[0]"] == "role and apiKey are mutually exclusive"
    assert reasons[f"{base}[1].apiKey"] == "unknown Kafka API key 'alterreplicalogdirs'"
    assert reasons[f"{base}[2].role"] == "invalid role 'admin': must be produce or consume"
    assert reasons[f"{base}[3].apiVersion"].endswith("must be a base-10 int16")
    assert reasons[f"{base}[4].apiVersion"].endswith("must be a base-10 int16")
    assert reasons[f"{base}[5].topic"] == "longer than 255 characters"
    assert reasons[f"{base}[6].topic"].startswith("invalid topic")


def test_kafka_tables() -> None:
    assert KAFKA_API_KEYS["produce"] == 0 and KAFKA_API_KEYS["alterconfigs"] == 33
    assert len(KAFKA_API_KEYS) == 34
    assert KAFKA_ROLES["produce"] == frozenset({0, 3, 18})
    assert KAFKA_ROLES["consume"] == frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18})


def test_dns_rules_are_l4_with_a_warning() -> None:
    warnings: list[FieldError] = []
    policy = parse_policy(cnp(egress({"toEndpoints": [{}], "toPorts": [{
        "ports": [{"port": "53", "protocol": "ANY"}], "rules": {"dns": [{"matchPattern": "*"}]}}]})),
        warnings=warnings)
    assert egress_of(policy)[0].ports[0] == PortRule((PortProtocol(53, Protocol.ANY),))
    assert [w.path for w in warnings] == ["spec.egress[0].toPorts[0].rules.dns"]
    reasons = error_map(cnp(ingress(tcp("53", rules={"dns": [{"matchName": "a.com"}]}))))
    assert reasons["spec.ingress[0].toPorts[0].rules.dns"] == "DNS rules are not allowed on ingress"


@pytest.mark.parametrize("field, value", [
    ("listener", {"envoyConfig": {"name": "x"}, "name": "l"}),
    ("terminatingTLS", {"secret": {"name": "s"}}),
    ("originatingTLS", {"secret": {"name": "s"}}),
    ("serverNames", ["example.com"]),
])
def test_unsupported_port_rule_modifiers(field: str, value: Any) -> None:
    reasons = error_map(cnp(ingress(tcp("443", **{field: value}))))
    assert reasons[f"spec.ingress[0].toPorts[0].{field}"].endswith("not supported")


# --- deny and default deny -----------------------------------------------------


def test_deny_sections() -> None:
    rule = one_rule(cnp({"endpointSelector": {"matchLabels": {"role": "frontend"}},
                         "egress": [{"toEntities": ["all"]}],
                         "egressDeny": [{"toEndpoints": [{"matchLabels": {"role": "backend"}}]}],
                         "ingressDeny": [tcp("22")],
                         "enableDefaultDeny": {"ingress": False, "egress": True}}))
    assert rule.egress == (PeerRule(entities=("all",)),)
    assert rule.egress_deny == (PeerRule(selectors=(
        LabelSelector((("any:role", "backend"), (NS, "default"))),)),)
    assert rule.ingress_deny == (PeerRule(any_peer=True, ports=(
        PortRule((PortProtocol(22, Protocol.TCP),)),)),)
    assert rule.ingress is None
    assert rule.default_deny_ingress is False and rule.default_deny_egress is True


def test_l7_not_allowed_in_deny_rules() -> None:
    reasons = error_map(cnp({"endpointSelector": {}, "ingressDeny": [
        tcp("80", rules={"http": [{}]})]}))
    assert reasons["spec.ingressDeny[0].toPorts[0].rules"] == "L7 rules are not allowed in deny rules"


def test_default_deny_shapes() -> None:
    rule = one_rule(cnp({"endpointSelector": {}, "ingress": [], "egress": [{}]}))
    assert rule.ingress == ()
    assert rule.egress == (PeerRule(),)
    reasons = error_map(cnp({"endpointSelector": {}, "enableDefaultDeny": {"ingress": "yes"}}))
    assert reasons["spec.enableDefaultDeny.ingress"] == "must be a boolean, not string"


# --- type errors name the path ----------------------------------------------------


@pytest.mark.parametrize("spec, path, reason", [
    ({"endpointSelector": []}, "spec.endpointSelector", "must be an object, not list"),
    ({"endpointSelector": {}, "ingress": {}}, "spec.ingress", "must be a list, not object"),
    ({"endpointSelector": {}, "ingress": ["x"]}, "spec.ingress[0]", "must be an object, not string"),
    ({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].port", "must be 0-65535"),
    ({"endpointSelector": {}, "egress": [{"toCIDR": [1]}]}, "spec.egress[0].toCIDR[0]",
     "must be a string, not integer"),
    ({"endpointSelector": {"matchLabels": []}}, "spec.endpointSelector.matchLabels",
     "must be an object, not list"),
    ({"endpointSelector": {}, "description": 3}, "spec.description", "must be a string, not integer"),
])
def test_type_errors(spec: dict[str, Any], path: str, reason: str) -> None:
    assert error_map(cnp(spec))[path] == reason


def test_every_error_of_a_document_is_reported() -> None:
    errors = errors_of(cnp({"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": "99999"}, {"port": "1", "protocol": "XTP"}]}]},
        {"fromEntities": ["nowhere"]}]}, name=""))
    assert {e.path for e in errors} == {
        "metadata.name",
        "spec.ingress[0].toPorts[0].ports[0].port",
        "spec.ingress[0].toPorts[0].ports[1].protocol",
        "spec.ingress[1].fromEntities[0]",
    }


@pytest.mark.parametrize(("selector", "path"), [
    ({"matchLabels": {"a b": "v"}}, "spec.endpointSelector.matchLabels.a b"),
    ({"matchLabels": {"k8s:bad key!": "v"}}, "spec.endpointSelector.matchLabels.k8s:bad key!"),
    ({"matchLabels": {"foo:a b": "v"}}, "spec.endpointSelector.matchLabels.foo:a b"),
    ({"matchExpressions": [{"key": "bad key!", "operator": "Exists"}]},
     "spec.endpointSelector.matchExpressions[0].key"),
    ({"matchLabels": {"example.com/" + "n" * 64: "v"}}, "spec.endpointSelector.matchLabels.example.com/"),
])
def test_invalid_selector_key_is_rejected_naming_the_field(selector: Any, path: str) -> None:
    with pytest.raises(PolicyValidationError) as exc:
        parse_policy(ccnp({"endpointSelector": selector}))
    assert path in str(exc.value) and "invalid label key" in str(exc.value), str(exc.value)
