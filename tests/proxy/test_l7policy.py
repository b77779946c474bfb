"""Envoy holds every peer to the rules `flagella policy trace` shows.

Policies are resolved by the real engine; the resulting RBAC config runs in
the real Envoy (a static listener, source addresses on loopback stand for
peers); every (peer, request) pair must get the trace's L7 verdict.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from flagella.endpoint.model import Endpoint
from flagella.policy.api import Protocol, load_policies
from flagella.policy.engine import PolicyEngine
from flagella.policy.l7 import HTTPRequest
from flagella.policy.labels import Label, k8s_labels
from flagella.policy.resolver import EndpointInfo, PolicySettings
from flagella.policy.trace import Side, TraceQuery, Tracer
from flagella.proxy.enforcer import XdsEnforcer
from flagella.proxy.l7policy import direction_http_policy, http_redirect_ports, port_redirects
from flagella.proxy.rbac import peer_sets
from flagella.xds.server import XdsServer, XdsSettings
from tests.proxy.test_rbac_envoy import _curl, _envoy, upstream  # noqa: F401 (fixture)

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: default}
specs:
- endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}, {matchLabels: {app: admin}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}, {method: PUT, path: "/v1/.*", headers: ["X-Force: yes"]}]}
  - fromEndpoints: [{matchLabels: {app: ops}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{path: /metrics}]}
- endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: admin}}]
"""

SERVER_IP = "10.244.9.9"
PEERS = {  # app -> (identity, loopback source address)
    "client": (300, "127.0.0.2"),
    "admin": (301, "127.0.0.3"),
    "ops": (302, "127.0.0.4"),
    "stranger": (303, "127.0.0.5"),
}
REQUESTS = [
    HTTPRequest("GET", "/public"),
    HTTPRequest("GET", "/public?x"),
    HTTPRequest("DELETE", "/private"),
    HTTPRequest("PUT", "/v1/a", headers={"X-Force": "yes"}),
    HTTPRequest("PUT", "/v1/a"),
    HTTPRequest("GET", "/metrics"),
]


def _resolve() -> tuple[PolicyEngine, dict[str, Side]]:
    engine = PolicyEngine(PolicySettings())
    policies = load_policies(POLICY)
    engine.upsert_policies(policies)
    sides = {}
    for app, (ident, ip) in PEERS.items():
        labels = k8s_labels({"app": app}, "default")
        engine.set_identity(ident, labels)
        sides[app] = Side(labels, ipaddress.ip_address(ip))
    server = k8s_labels({"app": "server"}, "default")
    engine.set_identity(256, server)
    engine.upsert_endpoint(EndpointInfo(1, 256, server, addresses=frozenset({ipaddress.ip_address(SERVER_IP)})))
    sides["server"] = Side(server, ipaddress.ip_address(SERVER_IP))
    return engine, sides


def test_ports_and_peers_follow_the_kernel_decision() -> None:
    engine, _ = _resolve()
    state = engine.policy(1).ingress
    assert http_redirect_ports(state) == [80]
    redirects = dict(port_redirects(state, 80))
    assert set(redirects) == {300, 301, 302}  # no any-peer rule: strangers are dropped in BPF
    assert redirects[301].wildcard  # admin has an L3 rule too (spec 3.3 L7 wildcarding)
    assert not redirects[300].wildcard


def test_envoy_agrees_with_trace(upstream: int) -> None:  # noqa: F811
    engine, sides = _resolve()
    ipcache = {ipaddress.ip_network(f"{ip}/32"): ident for ident, ip in PEERS.values()}
    policy = direction_http_policy(1, [ipaddress.ip_address(SERVER_IP)], engine.policy(1).ingress, False,
                                   peer_sets(ipcache))
    (port80,) = policy.ports
    assert port80.redirect.port == 80 and port80.redirect.filter_name == "flagella/1/ingress/80"
    tracer = Tracer(load_policies(POLICY), PolicySettings())
    envoy, port = _envoy(port80.rbac, upstream)
    try:
        checked = 0
        for app, (_, ip) in PEERS.items():
            for req in REQUESTS:
                verdict = tracer.trace(TraceQuery(sides[app], sides["server"], (80, Protocol.TCP), req))
                headers = tuple(f"{k}: {v}" for k, v in req.headers.items())
                code, _ = _curl(port, req.path, ip, method=req.method, headers=headers)
                if app == "stranger":
                    # Dropped in BPF, never redirected; Envoy would fail closed anyway.
                    assert not verdict.allowed and code == 403
                    continue
                assert (code == 200) == verdict.allowed, (app, req, code, verdict.to_json())
                checked += 1
        assert checked == 18
    finally:
        envoy.stop()


@pytest.mark.parametrize("egress", [False, True])
def test_no_l7_rules_no_chains(egress: bool) -> None:
    engine = PolicyEngine(PolicySettings())
    labels = frozenset({Label("k8s", "app", "x")})
    engine.set_identity(256, labels)
    engine.upsert_endpoint(EndpointInfo(1, 256, labels))
    state = engine.policy(1).egress if egress else engine.policy(1).ingress
    assert direction_http_policy(1, [], state, egress, {}).ports == ()


HOST_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: host-l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /healthz}]}
"""
HOST_IP = "127.0.0.6"


@pytest.mark.parametrize("allow_localhost", ["always", "policy"])
def test_host_override_follows_allow_localhost(upstream: int, allow_localhost: str, tmp_path: Path) -> None:  # noqa: F811
    """Spec 3.3: with allow_localhost "always" the host gets the wildcard L7 rule on
    redirected ports (kubelet probes are never 403'd); with "policy" the host is held to
    its HTTP rules like any peer. Envoy, fed what the node proxy feeds it, agrees with
    trace either way."""
    settings = PolicySettings(allow_localhost=allow_localhost)  # type: ignore[arg-type]
    engine = PolicyEngine(settings)
    engine.upsert_policies(load_policies(HOST_POLICY))
    host_labels = frozenset({Label("reserved", "host")})
    engine.set_identity(1, host_labels)
    server = k8s_labels({"app": "server"}, "default")
    engine.set_identity(256, server)
    engine.upsert_endpoint(EndpointInfo(1, 256, server, addresses=frozenset({ipaddress.ip_address(SERVER_IP)})))
    ipcache = {ipaddress.ip_network(f"{HOST_IP}/32"): 1}
    # The RBAC exactly as the agent's XdsEnforcer builds it from the resolved policy.
    enforcer = XdsEnforcer(XdsServer(XdsSettings(unix_socket=tmp_path / "unused.sock")), None,
                           lambda: peer_sets(ipcache))
    ep = Endpoint(id=1, name="server", namespace="default", labels={}, ipv4=ipaddress.IPv4Address(SERVER_IP))
    policy = engine.policy(1)
    (port80,) = enforcer._entry(ep, policy.ingress, policy.egress, peer_sets(ipcache)).ingress.ports
    host = Side(host_labels, ipaddress.ip_address(HOST_IP))
    tracer = Tracer(load_policies(HOST_POLICY), settings)
    envoy, port = _envoy(port80.rbac, upstream)
    try:
        got = {}
        for req in (HTTPRequest("GET", "/healthz"), HTTPRequest("DELETE", "/private")):
            verdict = tracer.trace(
                TraceQuery(host, Side(server, ipaddress.ip_address(SERVER_IP)), (80, Protocol.TCP), req)
            )
            code, _ = _curl(port, req.path, HOST_IP, method=req.method)
            assert (code == 200) == verdict.allowed, (req, code, verdict.to_json())
            got[req.path] = code
        assert got == {"/healthz": 200, "/private": 200 if allow_localhost == "always" else 403}
    finally:
        envoy.stop()
