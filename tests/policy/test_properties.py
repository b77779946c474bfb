"""Property tests of the resolver's algebra (hypothesis)."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagella.policy.api import (
    LabelSelector,
    PeerRule,
    Policy,
    PortProtocol,
    PortRule,
    Protocol,
    Rule,
)
from flagella.policy.labels import k8s_labels
from flagella.policy.selectors import matches
from flagella.policy.trace import Side, TraceQuery, Tracer

APPS = ["a", "b", "c"]
NAMESPACES = ["x", "y"]
PODS = [(ns, app) for ns in NAMESPACES for app in APPS]
PORTS = [(80, Protocol.TCP), (81, Protocol.TCP), (80, Protocol.UDP)]

selectors = st.builds(
    lambda app, ns: LabelSelector(
        match_labels=tuple(
            sorted(
                ([("k8s:app", app)] if app else [])
                + ([("k8s:io.kubernetes.pod.namespace", ns)] if ns else [])
            )
        )
    ),
    st.sampled_from([None, *APPS]),
    st.sampled_from([None, *NAMESPACES]),
)
port_rules = st.lists(
    st.builds(
        lambda port, end, proto: PortProtocol(port=port, end_port=end, protocol=proto),
        st.sampled_from([0, 80, 81]),
        st.sampled_from([0, 81]),
        st.sampled_from([Protocol.TCP, Protocol.UDP, Protocol.ANY]),
    ),
    max_size=2,
)
peers = st.builds(
    lambda sels, any_peer, ports: PeerRule(
        selectors=tuple(sels),
        any_peer=any_peer and not sels,
        ports=(PortRule(ports=tuple(ports)),) if ports else (),
    ),
    st.lists(selectors, max_size=2),
    st.booleans(),
    port_rules,
)
rules = st.builds(
    lambda sel, ingress, egress: Rule(
        endpoint_selector=sel, ingress=tuple(ingress) or None, egress=tuple(egress) or None
    ),
    selectors,
    st.lists(peers, max_size=2),
    st.lists(peers, max_size=2),
)

ENFORCE_ALL = Rule(
    endpoint_selector=LabelSelector(),
    ingress=(PeerRule(),),
    egress=(PeerRule(),),
    labels=("k8s:io.cilium.k8s.policy.name=base",),
)


def as_policies(rule_list: list[Rule]) -> list[Policy]:
    return [
        Policy("CiliumClusterwideNetworkPolicy", f"p{i}", "", (r,)) for i, r in enumerate(rule_list)
    ]


def matrix(policies: list[Policy]) -> dict[tuple[object, ...], bool]:
    tracer = Tracer(policies)
    out = {}
    for i, (sns, sapp) in enumerate(PODS):
        for j, (dns, dapp) in enumerate(PODS):
            for port, proto in PORTS:
                q = TraceQuery(
                    Side(k8s_labels({"app": sapp}, sns), ipaddress.ip_address(f"10.244.0.{i + 10}")),
                    Side(k8s_labels({"app": dapp}, dns), ipaddress.ip_address(f"10.244.0.{j + 10}")),
                    (port, proto),
                )
                out[(sns, sapp, dns, dapp, port, proto)] = tracer.trace(q).allowed
    return out


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(rules, max_size=4), peers, selectors)
def test_adding_an_allow_rule_never_removes_an_allowed_pair(base, extra_peer, target):
    before = matrix(as_policies([ENFORCE_ALL, *base]))
    extra = Rule(endpoint_selector=target, ingress=(extra_peer,), egress=(extra_peer,))
    after = matrix(as_policies([ENFORCE_ALL, *base, extra]))
    lost = [k for k, allowed in before.items() if allowed and not after[k]]
    assert not lost


@SETTINGS
@given(st.lists(rules, max_size=4), selectors, selectors)
def test_a_deny_rule_always_wins(base, target, denied_peer):
    deny = Rule(
        endpoint_selector=target,
        ingress_deny=(PeerRule(selectors=(denied_peer,)),),
    )
    allow_all = Rule(endpoint_selector=LabelSelector(), ingress=(PeerRule(any_peer=True, ports=()),))
    result = matrix(as_policies([*base, allow_all, deny]))
    for (sns, sapp, dns, dapp, port, proto), allowed in result.items():
        src = k8s_labels({"app": sapp}, sns)
        dst = k8s_labels({"app": dapp}, dns)
        if matches(target, dst) and matches(denied_peer, src):
            assert not allowed, (sns, sapp, dns, dapp, port, proto)


@SETTINGS
@given(st.lists(rules, min_size=1, max_size=5), st.randoms())
def test_the_result_does_not_depend_on_rule_order(rule_list, rnd: random.Random):
    shuffled = list(rule_list)
    rnd.shuffle(shuffled)
    assert matrix(as_policies(rule_list)) == matrix(as_policies(shuffled))
