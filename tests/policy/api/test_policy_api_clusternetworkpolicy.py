"""Kubernetes ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) -> tiered Cilium rules."""

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
    Rule,
    load_policies,
    parse_policy,
)

NS = "k8s:io.kubernetes.pod.namespace"
NSL = "k8s:io.cilium.k8s.namespace.labels."
API = "policy.networking.k8s.io/v1alpha2"
LONG_KEY = "a" * 63
QUALIFIED_KEY = "a" * 253 + "/" + "b" * 63
ORIGIN = ("k8s:io.cilium.k8s.policy.derived-from=ClusterNetworkPolicy",
          "k8s:io.cilium.k8s.policy.name=cnp")
ALL_PODS = LabelSelector((), (Requirement(NS, "Exists"),))
X = {"namespaces": {"matchLabels": {"ns": "x"}}}
X_PODS = LabelSelector(((NSL + "ns", "x"),))


def cnp(spec: Any, *, name: str = "cnp", api_version: str = API, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name, **meta}, "spec": spec}


def spec(*, tier: str = "Admin", priority: int = 5, subject: Any = None, **sections: Any) -> dict[str, Any]:
    return {"tier": tier, "priority": priority,
            "subject": subject if subject is not None else {"namespaces": {}}, **sections}


def rules_of(doc: dict[str, Any], warnings: list[FieldError] | None = None) -> tuple[Rule, ...]:
    return parse_policy(doc, warnings=warnings).rules


def error_map(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(doc)
    return {e.path: e.reason for e in info.value.errors}


# -- translation ------------------------------------------------------------------------------


NAMESPACE_LABEL_LIMITS = f"""
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: namespace-label-limits
spec:
  tier: Admin
  priority: 1
  subject:
    namespaces:
      matchLabels:
        {LONG_KEY}: selected
        {QUALIFIED_KEY}: selected
  egress:
  - action: Accept
    to:
    - namespaces:
        matchLabels:
          {LONG_KEY}: selected
          {QUALIFIED_KEY}: selected
  - action: Deny
"""


def test_namespace_label_limits_document() -> None:
    warnings: list[FieldError] = []
    [policy] = load_policies(NAMESPACE_LABEL_LIMITS, warnings=warnings)
    assert warnings == []
    assert policy.key == ("ClusterNetworkPolicy", "", "namespace-label-limits")
    selected = LabelSelector(((NSL + LONG_KEY, "selected"), (NSL + QUALIFIED_KEY, "selected")))
    origin = ("k8s:io.cilium.k8s.policy.derived-from=ClusterNetworkPolicy",
              "k8s:io.cilium.k8s.policy.name=namespace-label-limits")
    assert policy.rules == (
        Rule(endpoint_selector=selected, egress=(PeerRule(selectors=(selected,)),),
             labels=origin, default_deny_ingress=False, default_deny_egress=False,
             tier="admin", precedence=10000),
        Rule(endpoint_selector=selected, egress_deny=(PeerRule(any_peer=True),),
             labels=origin, default_deny_ingress=False, default_deny_egress=False,
             tier="admin", precedence=10001),
    )


def test_actions_sections_tiers_and_precedence() -> None:
    rules = rules_of(cnp(spec(tier="Baseline", priority=7, ingress=[
        {"name": "a", "action": "Accept", "from": [X]},
        {"name": "d", "action": "Deny", "from": [X]},
        {"name": "p", "action": "Pass", "from": [X]},
    ], egress=[{"action": "Pass", "to": [X]}])))
    peer = (PeerRule(selectors=(X_PODS,)),)
    assert [(r.ingress, r.ingress_deny, r.ingress_pass, r.egress_pass) for r in rules] == [
        (peer, None, None, None), (None, peer, None, None), (None, None, peer, None),
        (None, None, None, peer)]
    assert [r.egress for r in rules] == [None] * 4 and [r.egress_deny for r in rules] == [None] * 4
    assert [r.precedence for r in rules] == [70000, 70001, 70002, 70000]
    assert {r.tier for r in rules} == {"baseline"}
    assert [r.description for r in rules] == ["a", "d", "p", ""]
    assert all(r.default_deny_ingress is False and r.default_deny_egress is False for r in rules)
    assert all(r.labels == ORIGIN for r in rules)


def test_priority_bounds_are_accepted() -> None:
    assert rules_of(cnp(spec(priority=0, egress=[{"action": "Deny"}])))[0].precedence == 0
    last = rules_of(cnp(spec(priority=1000, egress=[{"action": "Deny"}] * 25)))[-1]
    assert last.precedence == 1000 * 10000 + 24


@pytest.mark.parametrize("subject, selector", [
    ({"namespaces": {}}, ALL_PODS),
    ({"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
     LabelSelector(((NSL + "kubernetes.io/metadata.name", "x"),))),
    # Expressions alone could match the host or the world: limited to pods.
    ({"namespaces": {"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}},
     LabelSelector((), (Requirement(NSL + "env", "DoesNotExist"), Requirement(NS, "Exists")))),
    ({"pods": {"podSelector": {"matchLabels": {"app": "db"}}}},
     LabelSelector((("k8s:app", "db"),), (Requirement(NS, "Exists"),))),
    ({"pods": {"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {}}}, X_PODS),
    ({"pods": {"namespaceSelector": {"matchLabels": {"ns": "x"}},
               "podSelector": {"matchExpressions": [{"key": "app", "operator": "In",
                                                      "values": ["a", "b"]}]}}},
     LabelSelector(((NSL + "ns", "x"),), (Requirement("k8s:app", "In", ("a", "b")),))),
])
def test_subject(subject: Any, selector: LabelSelector) -> None:
    [rule] = rules_of(cnp(spec(subject=subject, ingress=[{"action": "Deny"}])))
    assert rule.endpoint_selector == selector


def test_peers_of_one_rule_are_unioned() -> None:
    [rule] = rules_of(cnp(spec(egress=[{"action": "Accept", "to": [
        X,
        {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}},
        {"networks": ["10.0.0.0/8", "fd00::/8", "192.168.1.7/24"]},
    ]}])))
    net = ipaddress.ip_network
    assert rule.egress == (PeerRule(
        selectors=(X_PODS, LabelSelector((("k8s:app", "db"),), (Requirement(NS, "Exists"),))),
        cidrs=(CIDRRule(net("10.0.0.0/8")), CIDRRule(net("fd00::/8")),
               CIDRRule(net("192.168.1.0/24"))),
    ),)


@pytest.mark.parametrize("rule", [{"action": "Deny"}, {"action": "Deny", "from": []},
                                  {"action": "Deny", "from": None}])
def test_rule_without_peers_applies_to_every_peer(rule: dict[str, Any]) -> None:
    [parsed] = rules_of(cnp(spec(ingress=[rule])))
    assert parsed.ingress_deny == (PeerRule(any_peer=True),)


def test_protocols() -> None:
    [rule] = rules_of(cnp(spec(ingress=[{"action": "Accept", "from": [X], "protocols": [
        {"tcp": {"destinationPort": {"number": 80}}},
        {"udp": {"destinationPort": {"range": {"start": 53, "end": 5353}}}},
        {"sctp": {"destinationPort": {"number": 9003}}},
        {"destinationNamedPort": "serve-81-tcp"},
    ]}])))
    assert rule.ingress == (PeerRule(selectors=(X_PODS,), ports=tuple(PortRule((p,)) for p in (
        PortProtocol(80, Protocol.TCP),
        PortProtocol(53, Protocol.UDP, end_port=5353),
        PortProtocol(9003, Protocol.SCTP),
        PortProtocol(0, Protocol.ANY, name="serve-81-tcp"),
    ))),)


def test_keys_and_enum_values_are_case_insensitive() -> None:
    doc = {"APIVERSION": API, "Kind": "ClusterNetworkPolicy", "metadata": {"Name": "cnp"},
           "Spec": {"Tier": "admin", "PRIORITY": 3, "subject": {"Namespaces": {}},
                    "Egress": [{"Action": "deny", "TO": [{"NETWORKS": ["1.2.3.0/24"]}],
                                "Protocols": [{"TCP": {"DestinationPort": {"Number": 443}}}]}]}}
    [rule] = rules_of(doc)
    assert rule.tier == "admin" and rule.precedence == 30000
    assert rule.egress_deny == (PeerRule(
        cidrs=(CIDRRule(ipaddress.ip_network("1.2.3.0/24")),),
        ports=(PortRule((PortProtocol(443, Protocol.TCP),)),)),)


def test_v1beta1_and_typed_lists() -> None:
    assert rules_of(cnp(spec(egress=[{"action": "Deny"}]),
                        api_version="policy.networking.k8s.io/v1beta1"))
    text = f"""
apiVersion: {API}
kind: ClusterNetworkPolicyList
items:
- metadata: {{name: one}}
  spec: {{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, ingress: [{{action: Deny}}]}}
- metadata: {{name: two}}
  spec: {{tier: Baseline, priority: 1, subject: {{namespaces: {{}}}}}}
"""
    one, two = load_policies(text)
    assert (one.name, len(one.rules), two.name, two.rules) == ("one", 1, "two", ())


def test_unenforceable_peers_in_accept_rules_warn_and_select_nothing() -> None:
    warnings: list[FieldError] = []
    [rule] = rules_of(cnp(spec(egress=[{"action": "Accept", "to": [
        {"nodes": {"matchLabels": {"kubernetes.io/os": "linux"}}},
        {"domainNames": ["kubernetes.io", "*.example.com"]},
    ]}])), warnings)
    assert rule.egress == (PeerRule(),)  # no peer, and not every peer
    assert [(w.path, w.reason) for w in warnings] == [
        ("spec.egress[0].to[0].nodes", "a node peer cannot be enforced: it allows no peer"),
        ("spec.egress[0].to[1].domainNames",
         "a DNS name peer cannot be enforced: it allows no peer"),
    ]


def test_metadata_namespace_is_ignored_with_a_warning() -> None:
    warnings: list[FieldError] = []
    policy = parse_policy(cnp(spec(), namespace="x"), warnings=warnings)
    assert policy.namespace == ""
    assert [w.path for w in warnings] == ["metadata.namespace"]


# -- errors -----------------------------------------------------------------------------------


def test_missing_api_version_is_ambiguous() -> None:
    doc = cnp(spec())
    del doc["apiVersion"]
    assert error_map(doc) == {"kind": "ClusterNetworkPolicy without apiVersion is ambiguous: "
                                      f"supported is {API} (set apiVersion)"}


def test_other_api_versions_are_rejected() -> None:
    antrea = {"apiVersion": "crd.antrea.io/v1beta1", "kind": "ClusterNetworkPolicy",
              "metadata": {"name": "acnp"}, "spec": {"appliedTo": [{"podSelector": {}}]}}
    [(path, reason)] = error_map(antrea).items()
    assert path == "apiVersion"
    assert reason.startswith("unsupported apiVersion 'crd.antrea.io/v1beta1' for "
                             "ClusterNetworkPolicy")


def test_load_errors_name_the_document() -> None:
    with pytest.raises(PolicyValidationError) as info:
        load_policies(NAMESPACE_LABEL_LIMITS.replace("priority: 1", "priority: 1001"), "c.yaml")
    [error] = info.value.errors
    assert (error.document, error.path, error.reason) == (
        "c.yaml#1 (ClusterNetworkPolicy namespace-label-limits)", "spec.priority", "must be 0-1000")


def test_spec_errors() -> None:
    assert error_map(cnp(None)) == {"spec": "required"}
    reasons = error_map(cnp({"priority": "1", "subject": {}, "ingres": []}))
    assert reasons == {
        "spec.ingres": "unknown field (did you mean 'ingress'?)",
        "spec.tier": "required: Admin or Baseline",
        "spec.priority": "must be an integer, not string",
        "spec.subject": "must set exactly one of namespaces, pods",
    }
    reasons = error_map(cnp({"tier": "NetworkPolicy", "priority": -1}))
    assert reasons == {
        "spec.tier": "invalid tier 'NetworkPolicy': must be Admin or Baseline",
        "spec.priority": "must be 0-1000",
        "spec.subject": "required: namespaces or pods",
    }


def test_subject_errors() -> None:
    reasons = error_map(cnp(spec(subject={"namespaces": {}, "pods": {"podSelector": {}}})))
    assert reasons == {"spec.subject": "exactly one of namespaces, pods may be set, "
                                       "not namespaces and pods"}
    reasons = error_map(cnp(spec(subject={"pods": {"namespaceSelector": {}}})))
    assert reasons == {"spec.subject.pods.podSelector": "required (use {} to select every pod)"}
    reasons = error_map(cnp(spec(subject={"namespaces": {"matchLabels": {"a" * 64: "x"}}})))
    assert list(reasons) == [f"spec.subject.namespaces.matchLabels.{'a' * 64}"]
    assert reasons[f"spec.subject.namespaces.matchLabels.{'a' * 64}"].startswith(
        "invalid label key")
    too_long_prefix = "a" * 254 + "/b"
    assert list(error_map(cnp(spec(subject={"namespaces": {"matchLabels": {
        too_long_prefix: "x"}}})))) == [f"spec.subject.namespaces.matchLabels.{too_long_prefix}"]


def test_rule_errors() -> None:
    reasons = error_map(cnp(spec(ingress=[
        {"from": [X]},
        {"action": "Allow", "from": [X]},
        {"action": "Accept", "name": "n" * 101},
        {"action": "Accept", "to": [X]},
        {"action": "Accept", "ports": [{"portNumber": {"protocol": "TCP", "port": 80}}]},
    ])))
    assert reasons == {
        "spec.ingress[0].action": "required: Accept, Deny or Pass",
        "spec.ingress[1].action": "invalid action 'Allow': must be Accept, Deny or Pass",
        "spec.ingress[2].name": "longer than 100 characters",
        "spec.ingress[3].to": "unknown field",
        "spec.ingress[4].ports": "unknown field",
    }
    reasons = error_map(cnp(spec(egress=[{"action": "Deny"}] * 26)))
    assert reasons == {"spec.egress": "too many items (26), the max is 25"}


def test_peer_errors() -> None:
    reasons = error_map(cnp(spec(
        ingress=[{"action": "Accept", "from": [{}, {"networks": ["10.0.0.0/8"]}]}],
        egress=[{"action": "Deny", "to": [
            {"namespaces": {}, "pods": {"podSelector": {}}},
            {"networks": ["10.0.0.1"]},
            {"networks": ["10.0.0.0/33", "banana"]},
            {"networks": []},
            {"nodes": {}},
        ]}, {"action": "Pass", "to": [{"domainNames": ["example.com"]}]},
            {"action": "Accept", "to": [{"domainNames": ["ex ample.com", "*"]}]}])))
    i, e = "spec.ingress[0].from", "spec.egress[0].to"
    assert reasons == {
        f"{i}[0]": "must set exactly one of namespaces, pods",
        f"{i}[1].networks": "unknown field",
        f"{e}[0]": "exactly one of namespaces, pods, nodes, networks, domainNames may be set, "
                   "not namespaces and pods",
        f"{e}[1].networks[0]": "invalid CIDR '10.0.0.1': must be IP/prefix-length",
        f"{e}[2].networks[0]": reasons[f"{e}[2].networks[0]"],
        f"{e}[2].networks[1]": "invalid CIDR 'banana': must be IP/prefix-length",
        f"{e}[3].networks": "must not be empty (omit the field instead)",
        f"{e}[4].nodes": "a node peer cannot be enforced in a Deny rule",
        "spec.egress[1].to[0].domainNames": "domainNames is only supported in Accept rules",
        "spec.egress[2].to[0].domainNames[0]": "invalid domain name 'ex ample.com': DNS labels "
                                               "separated by '.', optionally after a leading '*.'",
        "spec.egress[2].to[0].domainNames[1]": "invalid domain name '*': DNS labels "
                                               "separated by '.', optionally after a leading '*.'",
    }
    assert reasons[f"{e}[2].networks[0]"].startswith("invalid CIDR '10.0.0.0/33'")


def test_protocol_errors() -> None:
    p = "spec.egress[0].protocols"
    reasons = error_map(cnp(spec(egress=[{"action": "Accept", "to": [X], "protocols": [
        {"tcp": {"destinationPort": {"number": 0}}},
        {"udp": {"destinationPort": {"number": 65536}}},
        {"sctp": {"destinationPort": {"range": {"start": 90, "end": 80}}}},
        {"tcp": {"destinationPort": {"range": {"start": 80}}}},
        {"tcp": {}},
        {"tcp": {"destinationPort": {"number": 80, "range": {"start": 1, "end": 2}}}},
        {"tcp": {"destinationPort": {"number": "80"}}},
        {"tcp": {"destinationPort": {"number": 80}}, "udp": {"destinationPort": {"number": 80}}},
        {"destinationNamedPort": "Web_Port"},
        {"icmp": {}},
    ]}, {"action": "Accept", "to": [X], "protocols": []}])))
    assert reasons == {
        f"{p}[0].tcp.destinationPort.number": "must be 1-65535",
        f"{p}[1].udp.destinationPort.number": "must be 1-65535",
        f"{p}[2].sctp.destinationPort.range": "start (90) must be less than end (80)",
        f"{p}[3].tcp.destinationPort.range.end": "required",
        f"{p}[4].tcp.destinationPort": "required (omit protocols to match every port)",
        f"{p}[5].tcp.destinationPort": "exactly one of number, range may be set, "
                                       "not number and range",
        f"{p}[6].tcp.destinationPort.number": "must be an integer, not string",
        f"{p}[7]": "exactly one of tcp, udp, sctp, destinationNamedPort may be set, "
                   "not tcp and udp",
        f"{p}[8].destinationNamedPort": "invalid port name 'Web_Port': at most 15 of [a-z0-9-] "
                                        "with a letter, no leading, trailing or double '-'",
        f"{p}[9].icmp": "unknown field",
        "spec.egress[1].protocols": "must not be empty (omit the field instead)",
    }


def test_named_ports_need_pod_peers() -> None:
    reasons = error_map(cnp(spec(egress=[{"action": "Accept", "to": [
        X, {"networks": ["10.0.0.0/8"]}], "protocols": [
        {"tcp": {"destinationPort": {"number": 80}}}, {"destinationNamedPort": "web"}]}])))
    assert reasons == {"spec.egress[0].protocols[1]": "a destinationNamedPort cannot be used with "
                                                      "a networks peer (it has no named ports)"}
    [rule] = rules_of(cnp(spec(egress=[{"action": "Accept", "to": [X],
                                        "protocols": [{"destinationNamedPort": "web"}]}])))
    assert rule.egress is not None
    assert rule.egress[0].ports == (PortRule((PortProtocol(0, Protocol.ANY, name="web"),)),)


def test_named_ports_are_case_insensitive() -> None:
    [rule] = rules_of(cnp(spec(ingress=[{"action": "Accept",
                                         "protocols": [{"destinationNamedPort": "HTTP-Alt"}]}])))
    assert rule.ingress == (PeerRule(any_peer=True, ports=(
        PortRule((PortProtocol(0, Protocol.ANY, name="http-alt"),)),)),)


def test_a_null_union_member_sets_nothing() -> None:
    reasons = error_map(cnp(spec(subject={"namespaces": None},
                                 egress=[{"action": "Deny", "to": [{"pods": None}]}])))
    assert reasons == {"spec.subject": "must set exactly one of namespaces, pods",
                       "spec.egress[0].to[0]": "must set exactly one of namespaces, pods, nodes, "
                                               "networks, domainNames"}
