"""ClusterNetworkPolicy tiers at trace level: Admin before NetworkPolicy/CNP before Baseline."""

from __future__ import annotations

import ipaddress

import pytest

from flagella.datapath.desired import policy_entries
from flagella.datapath.entries import PolicyValue
from flagella.policy.api import Protocol as P
from flagella.policy.api import load_policies
from flagella.policy.labels import k8s_labels
from flagella.policy.mapstate import Entry, Key, MapState, Verdict, decide
from flagella.policy.resolver import PolicySettings
from flagella.policy.trace import Side, TraceQuery, Tracer

LONG_KEY = "a" * 63
QUALIFIED_KEY = "a" * 253 + "/" + "b" * 63


def pod(app: str, ns: str = "x", ip: str | None = None, ns_labels: dict[str, str] | None = None,
        **named: str) -> Side:
    ports = {}
    for name, spec in named.items():
        port, proto = spec.split("/")
        ports[name.replace("_", "-")] = frozenset({(int(port), P[proto].number)})
    labels = k8s_labels({"app": app}, ns, {"ns": ns, **(ns_labels or {})})
    return Side(labels, ipaddress.ip_address(ip) if ip else None, ports)


def world(ip: str) -> Side:
    return Side(None, ipaddress.ip_address(ip))


def tracer(*docs: str, settings: PolicySettings | None = None) -> Tracer:
    return Tracer([p for doc in docs for p in load_policies(doc)], settings)


def allowed(t: Tracer, src: Side, dst: Side, port: int | None = 80, proto: P = P.TCP) -> bool:
    dport = (port, proto) if port is not None else None
    return t.trace(TraceQuery(src, dst, dport)).allowed


def cnp(name: str, tier: str, priority: int, subject: str, body: str) -> str:
    return f"""
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: {name}}}
spec:
  tier: {tier}
  priority: {priority}
  subject: {subject}
{body}"""


NS_X = "{namespaces: {matchLabels: {ns: x}}}"
ALL = "{namespaces: {}}"


# -- the namespace-label-limits case (Cilium pkg/policy/test/testdata) --------------------------


def limits_doc(*keys: str) -> str:
    labels = "\n".join(f"        {k}: selected" for k in keys)
    peer_labels = "\n".join(f"          {k}: selected" for k in keys)
    return f"""
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
{labels}
  egress:
  - action: Accept
    to:
    - namespaces:
        matchLabels:
{peer_labels}
  - action: Deny
"""


@pytest.mark.parametrize("keys", [("team",), ("team", "example.com/zone"),
                                  (LONG_KEY, QUALIFIED_KEY)])
def test_namespace_label_limits(keys: tuple[str, ...]) -> None:
    t = tracer(limits_doc(*keys))
    selected = dict.fromkeys(keys, "selected")
    client = Side(k8s_labels({"app": "client"}, "selected", selected))
    server = Side(k8s_labels({"app": "server"}, "selected", selected))
    other = Side(k8s_labels({"app": "other-server"}, "unselected"))
    assert allowed(t, client, server)
    assert not allowed(t, client, other)
    # Only egress of the subject is governed.
    assert allowed(t, other, client)
    assert allowed(t, other, server)
    result = t.trace(TraceQuery(client, other, (80, P.TCP)))
    assert result.to_json()["rules"] == ["namespace-label-limits"]
    assert not result.egress.to_json()["enforced"]


# -- Admin tier ------------------------------------------------------------------------------------

DENY_ALL_INGRESS_NP = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
"""


def test_admin_accept_overrides_a_network_policy_default_deny() -> None:
    admin = cnp("allow-monitoring", "Admin", 10, NS_X, """
  ingress:
  - action: Accept
    from: [{namespaces: {matchLabels: {ns: monitoring}}}]
""")
    assert not allowed(tracer(DENY_ALL_INGRESS_NP), pod("prom", "monitoring"), pod("web"))
    t = tracer(DENY_ALL_INGRESS_NP, admin)
    assert allowed(t, pod("prom", "monitoring"), pod("web"))
    assert not allowed(t, pod("other", "y"), pod("web"))  # the NetworkPolicy still decides
    assert not allowed(t, pod("a"), pod("web"))


CNP_ALLOW_ALL = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-all, namespace: x}
spec:
  endpointSelector: {}
  ingress: [{fromEntities: [all]}]
  egress: [{toEntities: [all]}]
"""


def test_admin_deny_overrides_a_cilium_network_policy_allow() -> None:
    admin = cnp("no-db-from-y", "Admin", 3, "{pods: {podSelector: {matchLabels: {app: db}}}}", """
  ingress:
  - action: Deny
    from: [{namespaces: {matchLabels: {ns: y}}}]
    protocols: [{tcp: {destinationPort: {range: {start: 5000, end: 6000}}}}]
""")
    t = tracer(CNP_ALLOW_ALL, admin)
    assert not allowed(t, pod("c", "y"), pod("db"), 5432)
    assert allowed(t, pod("c", "y"), pod("db"), 80)  # outside the range: the CNP allows
    assert allowed(t, pod("c", "y"), pod("db"), 5432, P.UDP)
    assert allowed(t, pod("c", "z"), pod("db"), 5432)
    assert allowed(t, pod("c", "y"), pod("web"), 5432)  # not a subject
    result = t.trace(TraceQuery(pod("c", "y"), pod("db"), (5432, P.TCP)))
    assert result.to_json()["rules"] == ["no-db-from-y"]


def test_admin_accept_skips_cilium_l7_rules_and_requires() -> None:
    l7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{}]
    toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]
"""
    admin = cnp("trusted", "Admin", 1, ALL, """
  ingress:
  - action: Accept
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: trusted}}}}]
""")
    t = tracer(l7, admin)
    assert t.trace(TraceQuery(pod("trusted"), pod("api"), (80, P.TCP))).ingress.decision.verdict \
        == Verdict.ALLOW
    assert t.trace(TraceQuery(pod("web"), pod("api"), (80, P.TCP))).ingress.decision.verdict \
        == Verdict.REDIRECT


def test_pass_defers_to_network_policy() -> None:
    admin = cnp("pass-then-deny", "Admin", 5, NS_X, """
  ingress:
  - action: Pass
    from: [{namespaces: {matchLabels: {ns: y}}}]
  - action: Deny
""")
    np_allow_y_web = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {app: ok}}}]}]
"""
    t = tracer(admin, np_allow_y_web)
    assert allowed(t, pod("ok", "y"), pod("web"))        # passed, the NetworkPolicy allows
    assert not allowed(t, pod("bad", "y"), pod("web"))   # passed, the NetworkPolicy denies
    assert allowed(t, pod("bad", "y"), pod("db"))        # passed, no NetworkPolicy: allowed
    assert not allowed(t, pod("ok", "z"), pod("web"))    # not passed: the Admin Deny
    assert not allowed(t, pod("ok", "z"), pod("db"))


def test_pass_skips_only_the_admin_tier() -> None:
    admin = cnp("pass", "Admin", 5, NS_X, """
  egress:
  - action: Pass
    to: [{namespaces: {matchLabels: {ns: y}}}]
""")
    baseline = cnp("baseline-deny", "Baseline", 5, NS_X, """
  egress:
  - action: Deny
    to: [{namespaces: {matchLabels: {ns: y}}}]
""")
    t = tracer(admin, baseline)
    assert not allowed(t, pod("a"), pod("b", "y"))  # no NetworkPolicy: the Baseline decides
    t = tracer(admin, baseline, """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-to-y, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
""")
    assert allowed(t, pod("a"), pod("b", "y"))


def test_priority_orders_policies() -> None:
    def accept(priority: int) -> str:
        return cnp("accept", "Admin", priority, NS_X, """
  ingress:
  - action: Accept
    from: [{namespaces: {matchLabels: {ns: y}}}]
""")

    def deny(priority: int) -> str:
        return cnp("deny", "Admin", priority, NS_X, """
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
""")

    assert allowed(tracer(accept(10), deny(20)), pod("a", "y"), pod("b"))
    assert not allowed(tracer(accept(20), deny(10)), pod("a", "y"), pod("b"))
    assert not allowed(tracer(deny(10), accept(20)), pod("a", "y"), pod("b"))
    assert not allowed(tracer(accept(10), deny(20)), pod("a", "z"), pod("b"))
    # Priority 0 comes first, 1000 last.
    assert allowed(tracer(accept(0), deny(1000)), pod("a", "y"), pod("b"))
    assert not allowed(tracer(accept(1000), deny(0)), pod("a", "y"), pod("b"))


def test_a_later_rule_of_a_lower_priority_policy_still_comes_first() -> None:
    first = cnp("first", "Admin", 1, NS_X, """
  egress:
  - action: Pass
    to: [{namespaces: {matchLabels: {ns: z}}}]
""" + "\n".join(["  - action: Pass\n    to: [{namespaces: {matchLabels: {ns: q}}}]"] * 20) + """
  - action: Accept
    to: [{namespaces: {matchLabels: {ns: y}}}]
""")
    second = cnp("second", "Admin", 2, NS_X, """
  egress:
  - action: Deny
""")
    t = tracer(first, second)
    assert allowed(t, pod("a"), pod("b", "y"))
    assert not allowed(t, pod("a"), pod("b", "w"))


def test_rule_order_within_a_policy() -> None:
    def policy(*rules: str) -> str:
        return cnp("ordered", "Admin", 1, NS_X, "  egress:\n" + "".join(rules))

    accept_y = "  - action: Accept\n    to: [{namespaces: {matchLabels: {ns: y}}}]\n"
    deny_all = "  - action: Deny\n    to: [{namespaces: {}}]\n"
    assert allowed(tracer(policy(accept_y, deny_all)), pod("a"), pod("b", "y"))
    assert not allowed(tracer(policy(deny_all, accept_y)), pod("a"), pod("b", "y"))
    assert not allowed(tracer(policy(accept_y, deny_all)), pod("a"), pod("b", "z"))


def test_same_priority_conflicts_resolve_to_deny() -> None:
    a = cnp("a", "Admin", 7, NS_X, "  egress:\n  - action: Accept\n    to: [{namespaces: {}}]\n")
    b = cnp("b", "Admin", 7, NS_X, "  egress:\n  - action: Deny\n    to: [{namespaces: {}}]\n")
    assert not allowed(tracer(a, b), pod("a"), pod("b", "y"))


def test_admin_rules_alone_never_enforce() -> None:
    accept_y = cnp("accept-y", "Admin", 1, NS_X, """
  ingress:
  - action: Accept
    from: [{namespaces: {matchLabels: {ns: y}}}]
""")
    t = tracer(accept_y)
    assert allowed(t, pod("a", "z"), pod("b"))
    assert allowed(t, world("1.2.3.4"), pod("b"))
    assert not t.trace(TraceQuery(pod("a", "z"), pod("b"), (80, P.TCP))).ingress.to_json()[
        "enforced"]


def test_protocols_and_named_ports() -> None:
    admin = cnp("ports", "Admin", 1, NS_X, """
  ingress:
  - action: Deny
    from: [{namespaces: {matchLabels: {ns: y}}}]
    protocols:
    - udp: {destinationPort: {number: 53}}
    - destinationNamedPort: metrics
""")
    t = tracer(admin)
    web = pod("web", metrics="9090/TCP")
    assert not allowed(t, pod("c", "y"), web, 53, P.UDP)
    assert allowed(t, pod("c", "y"), web, 53, P.TCP)
    assert not allowed(t, pod("c", "y"), web, 9090, P.TCP)
    assert allowed(t, pod("c", "y"), web, 9091, P.TCP)
    assert allowed(t, pod("c", "y"), pod("nometrics"), 9090, P.TCP)


def test_networks_match_external_addresses_and_pods() -> None:
    admin = cnp("egress-networks", "Admin", 1, NS_X, """
  egress:
  - action: Accept
    to: [{networks: [203.0.113.0/24]}]
  - action: Deny
    to: [{networks: [0.0.0.0/0]}]
""")
    t = tracer(admin)
    assert allowed(t, pod("a"), world("203.0.113.9"))
    assert not allowed(t, pod("a"), world("198.51.100.1"))
    assert not allowed(t, pod("a"), pod("b", "y", ip="10.244.2.11"))  # pods are in 0.0.0.0/0


# -- Baseline tier ---------------------------------------------------------------------------------

BASELINE = cnp("baseline", "Baseline", 10, NS_X, """
  ingress:
  - action: Accept
    from: [{namespaces: {matchLabels: {ns: y}}}]
  - action: Deny
""")


def test_baseline_applies_to_endpoints_no_network_policy_enforces() -> None:
    np_web = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-z, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]
"""
    t = tracer(BASELINE, np_web)
    # db: no NetworkPolicy, the Baseline decides (first matching rule).
    assert allowed(t, pod("c", "y"), pod("db"))
    assert not allowed(t, pod("c", "z"), pod("db"))
    assert not allowed(t, world("1.2.3.4"), pod("db"))
    # web: a NetworkPolicy enforces ingress and decides alone.
    assert allowed(t, pod("c", "z"), pod("web"))
    assert not allowed(t, pod("c", "y"), pod("web"))
    # Egress of db is not governed by any of it.
    assert allowed(t, pod("db"), pod("c", "z"))


def test_a_cilium_policy_enforcing_the_direction_also_overrides_the_baseline() -> None:
    cnp_db = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": z}}]}]
"""
    t = tracer(BASELINE, cnp_db)
    assert allowed(t, pod("c", "z"), pod("db"))
    assert not allowed(t, pod("c", "y"), pod("db"))


def test_baseline_priority_and_pass() -> None:
    early = cnp("early", "Baseline", 1, NS_X, """
  ingress:
  - action: Pass
    from: [{namespaces: {matchLabels: {ns: z}}}]
""")
    t = tracer(BASELINE, early)
    assert allowed(t, pod("c", "z"), pod("db"))  # Pass in the last tier: the default, allow
    assert not allowed(t, pod("c", "w"), pod("db"))


def test_admin_comes_before_baseline() -> None:
    admin = cnp("admin", "Admin", 1000, NS_X, """
  ingress:
  - action: Accept
    from: [{namespaces: {matchLabels: {ns: z}}}]
""")
    assert allowed(tracer(BASELINE, admin), pod("c", "z"), pod("db"))


def test_enforcement_modes() -> None:
    def ingress_allowed(t: Tracer, src: Side, dst: Side) -> bool:
        return t.trace(TraceQuery(src, dst, (80, P.TCP))).ingress.allowed

    always, never = PolicySettings(enforcement="always"), PolicySettings(enforcement="never")
    admin = cnp("admin", "Admin", 1, NS_X, "  ingress:\n  - action: Accept\n")
    assert ingress_allowed(tracer(admin, settings=always), pod("c", "y"), pod("db"))
    assert not ingress_allowed(tracer(admin, settings=always), pod("c", "y"), pod("db", "y"))
    assert ingress_allowed(tracer(BASELINE, settings=never), pod("c", "z"), pod("db"))
    # "always" enforces every endpoint: the normal tier decides, never the baseline.
    assert not ingress_allowed(tracer(BASELINE, settings=always), pod("c", "y"), pod("db"))


# -- MapState and kernel values -------------------------------------------------------------------


def test_decide_by_tier() -> None:
    def key(prec: int, ident: int = 0) -> Key:
        return Key(ident, 0, 0, 65535, prec)

    allow, deny, pass_ = (Entry(v, None, frozenset({v.name})) for v in
                          (Verdict.ALLOW, Verdict.DENY, Verdict.PASS))
    assert decide([(key(5), allow), (key(9), deny), (key(0), allow)], False).verdict == Verdict.DENY
    assert decide([(key(9), pass_), (key(5), deny), (key(0), allow)], True).verdict == Verdict.ALLOW
    assert decide([(key(9), pass_), (key(-1), allow)], True).verdict == Verdict.DENY
    assert decide([(key(9), pass_), (key(-2), allow), (key(-1), deny)], False).verdict \
        == Verdict.DENY
    assert decide([(key(-1), pass_), (key(-2), deny)], False).verdict == Verdict.ALLOW
    decision = decide([(key(9), deny), (key(0, 7), Entry(Verdict.DENY, None, frozenset({"np"})))],
                      True)
    assert (decision.precedence, decision.rules) == (9, frozenset({"DENY"}))
    state = MapState(False)
    state.add(key(3), allow)
    state.add(key(3), pass_)
    state.add(key(4), allow)
    assert len(state) == 2 and state.entries[key(3)].verdict == Verdict.PASS


def test_kernel_values_carry_the_precedence() -> None:
    state = MapState(False)
    state.add(Key(300, 6, 80, 80, 7), Entry(Verdict.DENY))
    state.add(Key(300, 6, 80, 80, 0), Entry(Verdict.ALLOW))
    state.add(Key(301, 6, 80, 80, -2), Entry(Verdict.PASS))
    state.add(Key(301, 6, 80, 80, -1), Entry(Verdict.ALLOW))
    entries, _ = policy_entries(1, state, egress=True, proxy_port=15002)
    assert sorted((k.identity, v) for k, v in entries.items()) == [
        (300, PolicyValue(int(Verdict.DENY), 0, 7)),
        (301, PolicyValue(int(Verdict.ALLOW), 0, -1)),
    ]


def test_a_prefix_named_only_in_a_pass_rule() -> None:
    admin = cnp("pass-network", "Admin", 1, NS_X, """
  egress:
  - action: Pass
    to: [{networks: [203.0.113.0/24]}]
  - action: Deny
""")
    assert allowed(tracer(admin), pod("a"), world("203.0.113.5"))
