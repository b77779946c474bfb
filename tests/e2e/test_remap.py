"""The e2e runner's address remapping and probe planning (pure; no root needed)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.cases import Case, External, Pod, PortSpec, Probe, Step, load_cases
from tests.support.e2e_plan import (
    PLACEHOLDER,
    POD_NET4,
    POD_NET6,
    STANDARD_IPS,
    WORLD_NETS,
    case_external_ips,
    external_map,
    has_l7_rules,
    ipv6_for,
    plan_case,
    pod_map,
    rewrite_cidr,
    rewrite_policy,
    rewrite_rule,
    with_derived_icmp,
)

CASES = load_cases()
UPLINK = ipaddress.ip_network("192.0.2.0/24")


def ip(a: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(a)


def pairs(*items: tuple[str, str]) -> list:
    return [(ip(o), ip(n)) for o, n in items]


def matches(addr, rules: list[tuple[str, list[str]]]) -> bool:
    for cidr, excepts in rules:
        net = ipaddress.ip_network(cidr, strict=False)
        if addr.version == net.version and addr in net and not any(
            addr in ipaddress.ip_network(e, strict=False) for e in excepts
        ):
            return True
    return False


def mini_case(pods: dict[str, str], externals: dict[str, str] | None = None, probes=(), policies=()) -> Case:
    pod_objs = {}
    for key, addr in pods.items():
        ns, name = key.split("/")
        pod_objs[key] = Pod(ns, name, {"app": name}, addr, [PortSpec(80, "TCP", "http")], "default")
    exts = {n: External(n, a, "world") for n, a in (externals or {}).items()}
    return Case("mini", Path("mini.yaml"), {}, pod_objs, exts, [Step(1, list(policies), {}, {}, list(probes))])


# -- externals ------------------------------------------------------------------------------------


def test_external_map_is_testnet_distinct_and_deterministic():
    m = external_map(CASES)
    assert set(m) >= {"1.1.1.1", "8.8.8.8", "1.2.3.4"}
    assert len(set(m.values())) == len(m)
    for new in m.values():
        a = ip(new)
        assert any(a in n for n in WORLD_NETS)
        assert a not in UPLINK and a not in PLACEHOLDER
    assert external_map(list(reversed(CASES))) == m


# -- pods -----------------------------------------------------------------------------------------


def test_pod_map_keeps_pod_range_and_low_bits():
    case = mini_case({"x/a": "10.244.1.10", "d/star": "10.0.0.147", "d/dns": "10.1.0.53", "d/app": "10.1.10.1"})
    m = pod_map(case)
    assert m["x/a"] == "10.244.1.10"
    assert m["d/star"] == "10.244.0.147"
    assert m["d/dns"] == "10.244.0.53"
    assert m["d/app"] == "10.244.10.1"


def test_pod_map_avoids_standard_reserved_and_duplicate_addresses():
    case = mini_case({"a/a": "10.0.1.10", "a/b": "10.6.0.1", "a/c": "10.5.3.4", "a/d": "10.9.3.4"})
    m = pod_map(case)
    got = [ip(v) for v in m.values()]
    assert len(set(got)) == 4
    assert all(a in POD_NET4 for a in got)
    assert ip(m["a/a"]) not in STANDARD_IPS
    assert m["a/b"] != "10.244.0.1"


def test_every_corpus_case_plans_onto_test_addresses():
    ext = external_map(CASES)
    for case in CASES:
        plan = plan_case(case, ext)
        addrs = [ip(p.ipv4) for p in plan.pods.values()]
        assert len(set(addrs)) == len(addrs), case.id
        assert all(a in POD_NET4 for a in addrs), case.id
        for step in plan.steps:
            for pp in step.probes:
                for peer in (pp.src, pp.dst):
                    if peer is not None and peer.address:
                        a = ip(peer.address)
                        assert a in POD_NET4 or any(a in n for n in WORLD_NETS), (case.id, pp.label)


def test_standard_cluster_keeps_its_addresses():
    ext = external_map(CASES)
    case = next(c for c in CASES if c.id.startswith("tcp-01"))
    plan = plan_case(case, ext)
    assert {p.ipv4 for p in plan.pods.values()} == {str(a) for a in STANDARD_IPS}


def test_ipv6_twin():
    assert ipv6_for("10.244.1.10") == "fd00:10:244::1:10"
    assert ipv6_for("10.244.0.147") == "fd00:10:244::147"
    assert ipaddress.IPv6Address(ipv6_for("10.244.255.254")) in POD_NET6
    twins = {ipv6_for(f"10.244.{a}.{b}") for a in range(0, 256, 7) for b in range(0, 256, 5)}
    assert len(twins) == len(range(0, 256, 7)) * len(range(0, 256, 5))


# -- CIDRs ----------------------------------------------------------------------------------------

P = pairs(
    ("10.1.10.1", "10.244.10.1"),
    ("10.1.10.2", "10.244.10.2"),
    ("10.1.0.53", "10.244.0.53"),
    ("1.1.1.1", "198.51.100.10"),
    ("8.8.8.8", "198.51.100.12"),
)


def test_default_route_cidr_is_kept():
    assert rewrite_cidr("0.0.0.0/0", P) == "0.0.0.0/0"


def test_cidr_without_case_addresses_is_kept_verbatim():
    assert rewrite_cidr("192.168.0.0/16", P) == "192.168.0.0/16"
    assert rewrite_cidr("2001:db8::/32", P) == "2001:db8::/32"


def test_external_slash32_follows_its_address():
    assert rewrite_cidr("1.1.1.1/32", P) == "198.51.100.10/32"
    assert rewrite_cidr("8.8.8.8", P) == "198.51.100.12"  # a bare address stays bare


def test_external_prefix_becomes_a_prefix_holding_its_mapped_address():
    new = rewrite_cidr("1.1.1.0/24", P)
    assert new is not None and ip("198.51.100.10") in ipaddress.ip_network(new)
    assert ip("198.51.100.12") not in ipaddress.ip_network(new)


def test_pod_prefix_translates_with_its_slash16():
    assert rewrite_cidr("10.1.10.0/24", P) == "10.244.10.0/24"
    # host bits survive (non-canonical CIDRs are part of the corpus)
    q = pairs(("1.2.3.4", "10.244.3.4"), ("192.168.242.249", "10.244.242.249"))
    assert rewrite_cidr("192.168.242.213/24", q) == "10.244.242.213/24"


def test_prefix_a_moved_address_would_fall_into_is_not_kept():
    # 10.244.0.0/16 held none of the case's addresses, but the moved pods now live there.
    assert rewrite_cidr("10.244.0.0/16", P) is None
    assert rewrite_rule("10.244.0.0/16", [], P) == [(str(PLACEHOLDER), [])]


def test_mixed_prefix_is_split_into_exact_addresses():
    q = pairs(("1.2.3.4", "10.244.3.4"), ("1.1.1.1", "198.51.100.10"), ("9.9.9.9", "198.51.100.20"))
    rules = rewrite_rule("1.0.0.0/8", [], q)
    assert sorted(rules) == [("10.244.3.4/32", []), ("198.51.100.10/32", [])]


def test_except_is_rewritten_too():
    rules = rewrite_rule("0.0.0.0/0", ["1.1.1.1/32"], P)
    assert rules == [("0.0.0.0/0", ["198.51.100.10/32"])]
    rules = rewrite_rule("10.0.0.0/8", ["10.1.0.0/24"], P)
    for o, n in P:
        assert matches(n, rules) == (o in ipaddress.ip_network("10.0.0.0/8") and o not in ipaddress.ip_network("10.1.0.0/24"))


def test_policy_documents_are_rewritten_in_place_of_each_rule():
    knp = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "x"},
        "spec": {
            "podSelector": {},
            "egress": [{"to": [{"podSelector": {}}, {"ipBlock": {"cidr": "1.0.0.0/8", "except": ["1.1.1.0/24"]}}]}],
        },
    }
    q = pairs(("1.2.3.4", "10.244.3.4"), ("1.1.1.1", "198.51.100.10"))
    new = rewrite_policy(knp, q)
    peers = new["spec"]["egress"][0]["to"]
    assert peers[0] == {"podSelector": {}}
    assert [p["ipBlock"] for p in peers[1:]] == [{"cidr": "10.244.3.4/32"}]
    assert knp["spec"]["egress"][0]["to"][1]["ipBlock"]["cidr"] == "1.0.0.0/8"  # the input is not touched

    cnp = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "c"},
        "spec": {
            "endpointSelector": {},
            "egress": [{"toCIDR": ["1.1.1.1/32", "192.168.0.0/16"]}],
            "egressDeny": [{"toCIDRSet": [{"cidr": "0.0.0.0/0", "except": ["8.8.8.8/32"]}]}],
            "ingress": [{"fromCIDR": ["8.8.8.0/24"]}],
        },
    }
    new = rewrite_policy(cnp, P)
    assert new["spec"]["egress"][0]["toCIDR"] == ["198.51.100.10/32", "192.168.0.0/16"]
    assert new["spec"]["egressDeny"][0]["toCIDRSet"] == [{"cidr": "0.0.0.0/0", "except": ["198.51.100.12/32"]}]
    assert ip("198.51.100.12") in ipaddress.ip_network(new["spec"]["ingress"][0]["fromCIDR"][0])


octet = st.integers(0, 255)
addr4 = st.builds(lambda a, b, c, d: ipaddress.IPv4Address(f"{a}.{b}.{c}.{d}"), octet, octet, octet, octet)
near = st.builds(
    lambda s, c, d: ipaddress.IPv4Address(f"{s}.{c}.{d}"),
    st.sampled_from(["10.0", "10.1", "1.2", "192.168", "1.1", "8.8"]),
    st.sampled_from([0, 1, 3, 10, 20, 242]),
    st.sampled_from([1, 2, 4, 10, 53, 147, 249]),
)


@settings(max_examples=300, deadline=None)
@given(
    pods=st.lists(near, min_size=1, max_size=8, unique=True),
    exts=st.lists(near, min_size=0, max_size=4, unique=True),
    cidr=st.tuples(st.one_of(near, addr4), st.integers(0, 32)),
    excepts=st.lists(st.tuples(st.one_of(near, addr4), st.integers(8, 32)), max_size=2),
)
def test_rewritten_rules_match_exactly_the_moved_addresses(pods, exts, cidr, excepts):
    """The property the runner relies on: old rule matches an address iff new rules match its move."""
    case = mini_case({f"ns/p{i}": str(a) for i, a in enumerate(pods)})
    pm = pod_map(case)
    ext_map = {str(a): str(list(WORLD_NETS[0].hosts())[20 + i]) for i, a in enumerate(exts)}
    ps = [(ipaddress.ip_address(case.pods[k].ip), ip(v)) for k, v in pm.items()]
    ps += [(ip(o), ip(n)) for o, n in ext_map.items()]
    base = ipaddress.ip_network(f"{cidr[0]}/{cidr[1]}", strict=False)
    exc = [ipaddress.ip_network(f"{a}/{max(n, cidr[1])}", strict=False) for a, n in excepts]
    exc = [e for e in exc if e.subnet_of(base)]
    text = f"{cidr[0]}/{cidr[1]}"
    rules = rewrite_rule(text, [str(e) for e in exc], ps)
    for o, n in ps:
        old = o in base and not any(o in e for e in exc)
        assert matches(n, rules) == old, (o, n, text, exc, rules)
    for c, es in rules:
        cn = ipaddress.ip_network(c, strict=False)
        assert all(ipaddress.ip_network(e, strict=False).subnet_of(cn) for e in es)


# -- probes ---------------------------------------------------------------------------------------


def _plan(probe: Probe, policies=(), pods=None, externals=None, family=4):
    case = mini_case(pods or {"d/a": "10.0.0.1", "d/b": "10.0.0.2"}, externals, [probe], policies)
    plan = plan_case(case, {"1.1.1.1": "198.51.100.10"} if externals else {}, family)
    return plan.steps[0].probes[0]


def P_(src="d/a", dst="d/b", port=80, proto="TCP", expect="allow", **raw):
    r = {"from": src, "to": dst, "port": port, "protocol": proto, "expect": expect, **raw}
    return Probe(src, dst, port, proto, expect, http=raw.get("http"), kafka=raw.get("kafka"),
                 icmp_type=(raw.get("icmp") or {}).get("type"), loopback_ignored=bool(raw.get("loopback_ignored")), raw=r)


L7_POLICY = {"spec": {"ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"method": "GET"}]}}]}]}}
L4_POLICY = {"spec": {"ingress": [{"toPorts": [{"ports": [{"port": "80"}]}]}]}}


def test_plain_probe_is_checked_on_the_pod_addresses():
    pp = _plan(P_())
    assert (pp.action, pp.kind, pp.port) == ("check", "tcp", 80)
    assert pp.dst.address == "10.244.0.2" and pp.src.kind == "pod"


def test_sctp_is_skipped_and_loopback_is_informational():
    assert _plan(P_(proto="SCTP")).action == "skip"
    assert _plan(P_(dst="d/a", loopback_ignored=True)).action == "info"


def test_l7_probes():
    http = {"method": "GET", "path": "/"}
    assert _plan(P_(http=http)).action == "check"
    assert _plan(P_(expect="deny", http=http, deny_mode="drop")).action == "check"
    # HTTP goes through the node proxy: every HTTP probe is checked, L7 rejections too.
    assert _plan(P_(expect="deny", http=http, deny_mode="l7-reject")).action == "check"
    assert _plan(P_(expect="deny", http=http), [L7_POLICY]).action == "check"
    assert _plan(P_(expect="deny", http=http), [L4_POLICY]).action == "check"
    # Kafka to a pod: a real client against a broker in that pod (through the node proxy's
    # Kafka chain when L7 rules are in effect); IPv4 only.
    kafka = {"apiKey": "produce", "topic": "t"}
    pp = _plan(P_(expect="deny", port=9092, kafka=kafka), [L7_POLICY])
    assert (pp.action, pp.kind, pp.kafka) == ("check", "kafka", {"op": "produce", "topic": "t"})
    consume = _plan(P_(port=9092, kafka={"role": "consume", "topic": "t"}))
    assert (consume.kind, consume.kafka) == ("kafka", {"op": "consume", "topic": "t"})
    assert _plan(P_(expect="deny", port=9092, kafka=kafka), [L7_POLICY], family=6).action == "skip"
    case = mini_case({"d/a": "10.0.0.1", "d/b": "10.0.0.2"}, None, [P_(port=9092, kafka=kafka)], [])
    broker = plan_case(case, {}, 4).pods["d/b"]
    assert (broker.kafka_ports, broker.kafka_topics) == ({9092}, {"t"})
    assert (9092, "TCP") not in broker.serve  # the broker, not the plain server, listens there
    assert _plan(P_(expect="deny", port=53, proto="UDP", dns={"query": "x"}), [L4_POLICY]).kind == "udp"
    assert has_l7_rules(L7_POLICY) and not has_l7_rules(L4_POLICY)
    assert not has_l7_rules({"spec": {"rules": {"http": [{}]}}})  # "rules" outside toPorts


def test_world_host_and_icmp():
    ext = {"world/1.1.1.1": "1.1.1.1"}
    pp = _plan(P_(dst="world/1.1.1.1", proto="ICMP", port=None, icmp={"type": 8}), externals=ext)
    assert (pp.action, pp.kind, pp.icmp_type, pp.dst.address) == ("check", "icmp", 8, "198.51.100.10")
    pp = _plan(P_(src="world/1.1.1.1"), externals=ext)
    assert pp.src.kind == "world" and pp.src.address == "198.51.100.10"
    assert _plan(P_(dst="host")).action == "skip"
    assert _plan(P_(src="host")).src.kind == "host"
    assert _plan(P_(dst="kube-apiserver")).action == "skip"
    assert _plan(P_(proto="ICMP", port=None, icmp={"type": 13})).action == "skip"


def test_ipv6_family():
    pp = _plan(P_(proto="ICMP", port=None, icmp={"type": 8}), family=6)
    assert pp.icmp_type == 128 and ipaddress.ip_address(pp.dst.address).version == 6
    assert _plan(P_(src="host"), family=6).action == "skip"


def test_derived_icmp_only_for_port_free_policies():
    l3 = next(c for c in CASES if c.id.startswith("tcp-01"))
    derived = with_derived_icmp(l3)
    icmp = [p for p in derived.steps[0].probes if p.protocol == "ICMP"]
    assert len(icmp) == 81
    tcp = {(p.src, p.dst): p.expect for p in l3.steps[0].probes}
    assert all(p.expect == tcp[(p.src, p.dst)] for p in icmp)
    ports = next(c for c in CASES if c.id.startswith("tcp-19"))
    assert with_derived_icmp(ports).steps[0].probes == ports.steps[0].probes


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus_cidrs_keep_their_matches(case):
    ext = external_map(CASES)
    plan = plan_case(case, ext)
    ps = [(ip(case.pods[k].ip), ip(p.ipv4)) for k, p in plan.pods.items()]
    ps += [(ip(o), ip(n)) for o, n in ext.items() if o in case_external_ips(case)]
    for old_step, new_step in zip(case.steps, plan.steps, strict=True):
        old_rules: list = []
        new_rules: list = []
        _collect(old_step.policies, old_rules)
        _collect(new_step.policies, new_rules)
        assert new_rules == [r for c, e in old_rules for r in rewrite_rule(c, e, ps)]
        for c, e in old_rules:
            replaced = rewrite_rule(c, e, ps)
            for o, n in ps:
                assert matches(n, replaced) == matches(o, [(c, e)]), (c, e, o, n, replaced)


def _collect(node, out):
    if isinstance(node, list):
        for x in node:
            _collect(x, out)
    elif isinstance(node, dict):
        if "ipBlock" in node:
            out.append((node["ipBlock"]["cidr"], list(node["ipBlock"].get("except") or [])))
        for k, v in node.items():
            if k in ("toCIDR", "fromCIDR"):
                out.extend((c, []) for c in v)
            elif k in ("toCIDRSet", "fromCIDRSet"):
                out.extend((r["cidr"], list(r.get("except") or [])) for r in v)
            else:
                _collect(v, out)
