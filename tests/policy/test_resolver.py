"""Resolver semantics, one rule of the spec at a time (trace level)."""

from __future__ import annotations

import ipaddress

import pytest

from flagella.policy.api import Protocol as P
from flagella.policy.api import load_policies
from flagella.policy.l7 import HTTPRequest
from flagella.policy.labels import Label, k8s_labels
from flagella.policy.resolver import PolicySettings
from flagella.policy.trace import Side, TraceQuery, Tracer


def pod(app: str, ns: str = "default", ip: str | None = None, **named: str) -> Side:
    ports = {}
    for name, spec in named.items():
        port, proto = spec.split("/")
        ports[name.replace("_", "-")] = frozenset({(int(port), P[proto].number)})
    return Side(k8s_labels({"app": app}, ns), ipaddress.ip_address(ip) if ip else None, ports)


HOST = Side(frozenset({Label("reserved", "host")}))


def world(ip: str) -> Side:
    return Side(None, ipaddress.ip_address(ip))


def trace(policy_yaml: str, src: Side, dst: Side, port: int | None = 80, proto: P = P.TCP,
          http: HTTPRequest | None = None, settings: PolicySettings | None = None) -> bool:
    tracer = Tracer(load_policies(policy_yaml), settings)
    dport = (port, proto) if port is not None else None
    return tracer.trace(TraceQuery(src, dst, dport, http)).allowed


L7_AND_L3 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: default}
specs:
- endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}, {matchLabels: {app: admin}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}]}
- endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: admin}}]
"""


def test_l7_rules_restrict_the_selected_peer():
    get = HTTPRequest("GET", "/public")
    private = HTTPRequest("GET", "/private")
    assert trace(L7_AND_L3, pod("client"), pod("server"), http=get)
    assert not trace(L7_AND_L3, pod("client"), pod("server"), http=private)


def test_an_l3_rule_on_the_same_peer_wildcards_l7():
    assert trace(L7_AND_L3, pod("admin"), pod("server"), http=HTTPRequest("DELETE", "/private"))


def test_l7_path_is_a_full_match_including_the_query():
    assert not trace(L7_AND_L3, pod("client"), pod("server"), http=HTTPRequest("GET", "/public?x=1"))
    assert not trace(L7_AND_L3, pod("client"), pod("server"), http=HTTPRequest("GET", "/publicX"))


REQUIRES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: req, namespace: default}
specs:
- endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromRequires: [{matchLabels: {env: prod}}]
- endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{}]
"""


def test_requires_is_a_precondition_that_grants_nothing():
    prod = Side(k8s_labels({"app": "web", "env": "prod"}, "default"))
    dev = Side(k8s_labels({"app": "web", "env": "dev"}, "default"))
    db = pod("db")
    assert trace(REQUIRES, prod, db)
    assert not trace(REQUIRES, dev, db)


def test_enforcement_modes():
    nothing = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: n}\nspec: {endpointSelector: {matchLabels: {app: none}}}\n"
    assert trace(nothing, pod("a"), pod("b"))
    assert not trace(nothing, pod("a"), pod("b"), settings=PolicySettings(enforcement="always"))
    deny_all = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: d}\nspec: {endpointSelector: {}, ingress: [{}]}\n"
    assert not trace(deny_all, pod("a"), pod("b"))
    assert trace(deny_all, pod("a"), pod("b"), settings=PolicySettings(enforcement="never"))


def test_init_endpoints_are_default_deny_until_a_policy_selects_reserved_init():
    init = Side(frozenset({Label("reserved", "init")}))
    nothing = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: n}\nspec: {endpointSelector: {matchLabels: {app: none}}}\n"
    assert not trace(nothing, init, pod("b"))
    assert not trace(nothing, pod("b"), init)
    allow_init = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: init, namespace: default}
spec:
  endpointSelector: {matchLabels: {"reserved:init": ""}}
  egress: [{toEntities: [all]}]
"""
    assert trace(allow_init, init, pod("b"))


HOST_ONLY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: host, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEntities: [host]}]
"""


def test_host_is_not_world_unless_legacy_host_allows_world():
    policy_settings = PolicySettings(allow_localhost="policy")
    assert trace(HOST_ONLY, HOST, pod("web"), settings=policy_settings)
    assert not trace(HOST_ONLY, world("198.51.100.7"), pod("web"), settings=policy_settings)
    legacy = PolicySettings(allow_localhost="policy", legacy_host_allows_world=True)
    assert trace(HOST_ONLY, world("198.51.100.7"), pod("web"), settings=legacy)


def test_allow_localhost_always_lets_the_host_in_under_default_deny():
    deny_all = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: d}\nspec: {endpointSelector: {}, ingress: [{}]}\n"
    assert trace(deny_all, HOST, pod("web"))
    assert not trace(deny_all, HOST, pod("web"), settings=PolicySettings(allow_localhost="policy"))
    assert not trace(deny_all, world("203.0.113.9"), pod("web"))


IPBLOCK = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ipblock, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.9.0/24]}}]
"""


@pytest.mark.parametrize(
    ("src", "allowed"),
    [
        (pod("a", ip="10.244.1.5"), True),   # a pod inside the block
        (pod("a", ip="10.244.9.5"), False),  # a pod inside the except
        (world("10.244.3.3"), True),         # an outside address inside the block
        (world("198.51.100.1"), False),
    ],
)
def test_ipblock_matches_addresses_including_pods(src, allowed):
    assert trace(IPBLOCK, src, pod("web", ip="10.244.2.2")) is allowed


NAMED = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress: [{ports: [{port: http, protocol: TCP}]}]
  egress: [{ports: [{port: http, protocol: TCP}]}]
"""


def test_named_ports_resolve_through_the_endpoint_that_names_them():
    server = pod("server", ip="10.244.0.2", http="8080/TCP")
    other = pod("other", ip="10.244.0.3", http="9090/TCP")
    client = pod("client", ip="10.244.0.4")
    assert trace(NAMED, client, server, port=8080)
    assert not trace(NAMED, client, server, port=9090)
    assert trace(NAMED, client, other, port=9090)
    assert not trace(NAMED, client, other, port=8080)


RANGE_AND_ICMP = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: r, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts: [{ports: [{port: "8000", endPort: 8010, protocol: TCP}]}]
  - icmps: [{fields: [{type: 8, family: IPv4}]}]
"""


@pytest.mark.parametrize(("port", "proto", "allowed"), [
    (7999, P.TCP, False), (8000, P.TCP, True), (8005, P.TCP, True), (8010, P.TCP, True),
    (8011, P.TCP, False), (8005, P.UDP, False), (8, P.ICMP, True), (13, P.ICMP, False),
])
def test_port_ranges_and_icmp_types(port, proto, allowed):
    assert trace(RANGE_AND_ICMP, pod("a"), pod("web"), port=port, proto=proto) is allowed


DENY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEntities: [all]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: bad}}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""


def test_deny_wins_only_where_it_applies():
    assert not trace(DENY, pod("bad"), pod("web"), port=443)
    assert trace(DENY, pod("bad"), pod("web"), port=80)
    assert trace(DENY, pod("good"), pod("web"), port=443)


def test_egress_to_world_cidr_and_entities():
    egress = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: e, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toCIDR: [198.51.100.0/24]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toEntities: [cluster]
"""
    assert trace(egress, pod("web"), world("198.51.100.10"), port=443)
    assert not trace(egress, pod("web"), world("198.51.100.10"), port=80)
    assert not trace(egress, pod("web"), world("203.0.113.10"), port=443)
    assert trace(egress, pod("web"), pod("db", ns="other"), port=5432)
