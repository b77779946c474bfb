"""The datapath with real traffic between pod namespaces (root, real kernel).

Each test builds a node netns with two pods (see conftest_bpf), writes
endpoint/policy/ipcache entries with the map wrappers and checks what gets
through. Expected drops use short timeouts (0.5 s).
"""

# Fixtures come from conftest_bpf by explicit import, so test arguments shadow them:
# ruff: noqa: F811
from __future__ import annotations

import json
import time

import pytest
from conftest_bpf import (  # noqa: F401 (fixtures, used by name)
    Node,
    _session_events,
    datapath,
    drops,
    events,
    is_tombstone,
    node,
    requires_root,
    run,
    session_datapath,
)

from flagella.datapath.events import CtState, DropReason, EventReader, EventType
from flagella.datapath.maps import (
    CtKey,
    DatapathConfig,
    Direction,
    PolicyKey,
    Verdict,
    policy_keys_for_port_range,
)

pytestmark = [pytest.mark.root, requires_root]

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
DROP_WAIT = 0.5


def key(
    pod_ep: int, peer: int, egress: bool, proto: int, port: int = 0, wild: int = 0
) -> PolicyKey:
    return PolicyKey(pod_ep, peer, egress, proto, port, wild)


def test_unenforced_endpoints_pass_and_track(node: Node) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    node.set_endpoint(b)
    b.shell.tcp_listen(8080)
    assert a.shell.tcp_echo(b.v4, 8080)["ok"]
    ct = node.dp.maps.ct.items()
    # One entry at A's egress hook and one at B's ingress hook; replies create none.
    assert {(k.ep_id, k.egress) for k in ct if k.proto == TCP} == {
        (a.ep_id, True),
        (b.ep_id, False),
    }
    fwd = next(k for k in ct if k.ep_id == a.ep_id)
    assert (fwd.saddr, fwd.daddr, fwd.dport) == (a.ipv4, b.ipv4, 8080)


def test_tcp_allowed_and_denied_by_port(node: Node, events: EventReader) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    node.apply(b, {key(b.ep_id, a.identity, False, TCP, 8080): Verdict.ALLOW}, ingress=True)
    b.shell.tcp_listen(8080, 8081)
    assert a.shell.tcp_echo(b.v4, 8080)["ok"]
    assert a.shell.tcp_echo(b.v4, 8081, timeout=DROP_WAIT)["error"] == "timeout"
    ev, _ = events.wait_for(lambda e: e.type == EventType.DROP and e.dport == 8081, 1.0)
    assert ev is not None
    assert ev.reason == DropReason.POLICY_DENIED and ev.reason_text == "Policy denied (L3)"
    assert (ev.ep_id, ev.src_identity, ev.dst_identity) == (b.ep_id, a.identity, b.identity)
    assert (ev.saddr, ev.daddr, ev.proto, ev.direction) == (a.ipv4, b.ipv4, TCP, 1)
    assert ev.ct_state == CtState.NEW
    # The allow entry counted what it decided.
    entry = node.dp.maps.policy.get(key(b.ep_id, a.identity, False, TCP, 8080))
    assert entry is not None and entry.packets >= 3 and entry.bytes > 0


def test_port_range_as_aligned_blocks(node: Node) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    keys = policy_keys_for_port_range(b.ep_id, a.identity, False, TCP, 8079, 8084)
    assert [(k.port, k.wild_bits) for k in keys] == [(8079, 0), (8080, 2), (8084, 0)]
    node.apply(b, dict.fromkeys(keys, Verdict.ALLOW), ingress=True)
    b.shell.tcp_listen(8078, 8079, 8082, 8084, 8085)
    for port in (8079, 8082, 8084):
        assert a.shell.tcp_echo(b.v4, port)["ok"], port
    for port in (8078, 8085):
        assert a.shell.tcp_echo(b.v4, port, timeout=DROP_WAIT)["error"] == "timeout", port


def test_udp_allowed_and_denied(node: Node) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    node.apply(b, {key(b.ep_id, a.identity, False, UDP, 5353): Verdict.ALLOW}, ingress=True)
    b.shell.udp_listen(5353, 5354)
    assert a.shell.udp_echo(b.v4, 5353)["ok"]
    assert not a.shell.udp_echo(b.v4, 5354, timeout=DROP_WAIT)["ok"]
    assert b.shell.received() == {"udp/5353": 1}


def test_icmp_echo_with_every_direction_enforced(node: Node) -> None:
    a, b = node.a, node.b
    # A may send echo requests to B, B may receive them; nothing else is allowed anywhere,
    # so the replies pass only as conntrack replies.
    node.apply(
        a, {key(a.ep_id, b.identity, True, ICMP, 8): Verdict.ALLOW}, ingress=True, egress=True
    )
    node.apply(
        b, {key(b.ep_id, a.identity, False, ICMP, 8): Verdict.ALLOW}, ingress=True, egress=True
    )
    assert a.shell.ping(b.v4)["ok"]
    # B may not ping A, not even with the id of A's flow.
    assert not b.shell.ping(a.v4, timeout=DROP_WAIT, ident=5)["ok"]
    assert not b.shell.ping(a.v4, timeout=DROP_WAIT, ident=4242)["ok"]
    # Without B's ingress rule A's echo requests are dropped at B.
    node.apply(b, {}, ingress=True, egress=True)
    assert not a.shell.ping(b.v4, timeout=DROP_WAIT, ident=7)["ok"]


def test_ipv6_tcp_and_icmpv6(node: Node) -> None:
    a, b = node.a, node.b
    node.apply(
        a,
        {
            key(a.ep_id, b.identity, True, ICMPV6, 128): Verdict.ALLOW,
            key(a.ep_id, b.identity, True, TCP, 8080): Verdict.ALLOW,
        },
        egress=True,
    )
    node.apply(
        b,
        {
            key(b.ep_id, a.identity, False, TCP, 8080): Verdict.ALLOW,
            key(b.ep_id, a.identity, False, ICMPV6, 128): Verdict.ALLOW,
        },
        ingress=True,
        egress=True,
    )
    b.shell.tcp_listen(8080, 8081)
    assert a.shell.ping(b.v6)["ok"]
    assert a.shell.tcp_echo(b.v6, 8080)["ok"]
    assert a.shell.tcp_echo(b.v6, 8081, timeout=DROP_WAIT)["error"] == "timeout"
    assert not b.shell.ping(a.v6, timeout=DROP_WAIT)["ok"]


def test_deny_beats_allow(node: Node) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    node.apply(
        b,
        {
            PolicyKey.any_port(b.ep_id, a.identity, False, TCP): Verdict.ALLOW,  # all TCP from A
            key(b.ep_id, 0, False, TCP, 8080): Verdict.DENY,  # but port 8080 from anyone
        },
        ingress=True,
    )
    b.shell.tcp_listen(8080, 8081)
    assert a.shell.tcp_echo(b.v4, 8081)["ok"]
    assert a.shell.tcp_echo(b.v4, 8080, timeout=DROP_WAIT)["error"] == "timeout"
    # A DENY applies even where the direction is not enforced.
    node.apply(b, {key(b.ep_id, a.identity, False, TCP, 8081): Verdict.DENY})
    assert a.shell.tcp_echo(b.v4, 8081, timeout=DROP_WAIT)["error"] == "timeout"
    assert a.shell.tcp_echo(b.v4, 8080)["ok"]


def test_unenforced_direction_passes_and_replies_pass_enforced_reverse(node: Node) -> None:
    a, b = node.a, node.b
    # A: egress open, ingress enforced with no rules. B: open.
    node.apply(a, {}, ingress=True)
    node.set_endpoint(b)
    b.shell.tcp_listen(8080)
    b.shell.udp_listen(5353)
    a.shell.tcp_listen(9090)
    assert a.shell.tcp_echo(b.v4, 8080)["ok"]  # B's replies enter A as conntrack replies
    assert a.shell.udp_echo(b.v4, 5353)["ok"]
    assert b.shell.tcp_echo(a.v4, 9090, timeout=DROP_WAIT)["error"] == "timeout"


def test_ct_cleanup_when_policy_now_denies(node: Node, events: EventReader) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    allow = key(b.ep_id, a.identity, False, TCP, 8080)
    node.apply(b, {allow: Verdict.ALLOW}, ingress=True)
    b.shell.tcp_listen(8080)
    conn = a.shell.call("tcp_connect", addr=b.v4, port=8080, timeout=2)
    assert conn["ok"]
    assert a.shell.call("tcp_send_recv", conn=conn["conn"], data="one", timeout=2)["ok"]
    flow = CtKey(b.ep_id, False, TCP, a.ipv4, b.ipv4, conn["sport"], 8080)
    assert node.dp.maps.ct.get(flow) is not None

    node.dp.maps.policy.delete(allow)
    r = a.shell.call("tcp_send_recv", conn=conn["conn"], data="two", timeout=DROP_WAIT)
    assert r == {"ok": False, "error": "timeout"}
    assert is_tombstone(node.dp.maps.ct.get(flow))
    ev, _ = events.wait_for(
        lambda e: e.type == EventType.DROP and e.ct_state == CtState.ESTABLISHED, 1.0
    )
    assert ev is not None and ev.dport == 8080 and ev.sport == conn["sport"]
    a.shell.call("tcp_close", conn=conn["conn"])


def test_anti_spoofing(node: Node, events: EventReader) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    node.set_endpoint(b)
    b.shell.udp_listen(5353)
    run("ip", "addr", "add", "10.244.9.9/32", "dev", "eth0", netns=a.netns)
    run("ip", "-6", "addr", "add", "fd00:10:244::99/128", "dev", "eth0", "nodad", netns=a.netns)
    assert a.shell.udp_echo(b.v4, 5353)["ok"]
    assert not a.shell.udp_echo(b.v4, 5353, src="10.244.9.9", timeout=DROP_WAIT)["ok"]
    assert not a.shell.udp_echo(b.v6, 5353, src="fd00:10:244::99", timeout=DROP_WAIT)["ok"]
    assert b.shell.received() == {"udp/5353": 1}
    _, seen = events.wait_for(lambda e: False, 0.2)
    spoofed = drops(seen, DropReason.INVALID_SOURCE_IP)
    assert {str(e.saddr) for e in spoofed} == {"10.244.9.9", "fd00:10:244::99"}
    assert all(e.ep_id == a.ep_id and e.direction == Direction.EGRESS for e in spoofed)
    m = node.dp.maps.metrics.get(DropReason.INVALID_SOURCE_IP, Direction.EGRESS)
    assert m.packets == 2


def test_ipv4_fragments_follow_the_first_fragment(node: Node) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    node.apply(
        b, {key(b.ep_id, a.identity, False, UDP, 9000): Verdict.ALLOW}, ingress=True, egress=True
    )
    b.shell.udp_listen(9000, 9001)
    big = a.shell.udp_echo(b.v4, 9000, size=4000)
    assert big == {"ok": True, "size": 4000}  # reassembled both ways, reply fragments too
    frags = node.dp.maps.frag4.items()
    assert any(
        k.ep_id == b.ep_id and not k.egress and k.proto == UDP and ports[1] == 9000
        for k, ports in frags.items()
    )
    assert any(k.ep_id == b.ep_id and k.egress for k in frags)  # B's fragmented reply
    assert not a.shell.udp_echo(b.v4, 9001, size=4000, timeout=DROP_WAIT)["ok"]
    assert b.shell.received() == {"udp/9000": 1}


def test_metrics_count_forwarded_and_dropped(node: Node) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    node.apply(b, {key(b.ep_id, a.identity, False, UDP, 5353): Verdict.ALLOW}, ingress=True)
    b.shell.udp_listen(5353, 5354)
    assert a.shell.udp_echo(b.v4, 5353, size=100)["ok"]
    assert not a.shell.udp_echo(b.v4, 5354, size=100, timeout=DROP_WAIT)["ok"]
    m = node.dp.maps.metrics.read()
    fwd_in = m[next(k for k in m if k.reason == 0 and k.direction == Direction.INGRESS)]
    fwd_out = m[next(k for k in m if k.reason == 0 and k.direction == Direction.EGRESS)]
    # A->B request (egress at A, ingress at B) and B->A reply (egress at B, ingress at A),
    # plus A's second request at its egress.
    assert fwd_out.packets >= 3 and fwd_in.packets >= 2
    denied = node.dp.maps.metrics.get(DropReason.POLICY_DENIED, Direction.INGRESS)
    assert denied.packets == 1 and denied.bytes == 14 + 20 + 8 + 100


def test_trace_events_only_for_new_flows(node: Node, events: EventReader) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    node.set_endpoint(b)
    b.shell.tcp_listen(8080)
    node.dp.maps.config.set(DatapathConfig(trace_new_flows=True))
    conn = a.shell.call("tcp_connect", addr=b.v4, port=8080, timeout=2)
    for _ in range(3):
        assert a.shell.call("tcp_send_recv", conn=conn["conn"], data="x" * 10, timeout=2)["ok"]
    a.shell.call("tcp_close", conn=conn["conn"])
    _, seen = events.wait_for(lambda e: False, 0.3)
    traces = [e for e in seen if e.type == EventType.TRACE and e.proto == TCP]
    # One per hook that saw the flow's first packet: A's egress and B's ingress.
    assert sorted((e.ep_id, e.direction) for e in traces) == [(a.ep_id, 2), (b.ep_id, 1)]
    assert all(e.ct_state == CtState.NEW and e.sport == conn["sport"] for e in traces)


def test_redirect_marks_packets_for_the_proxy(node: Node) -> None:
    a, b = node.a, node.b
    node.apply(
        a, {key(a.ep_id, b.identity, True, TCP, 8080): (Verdict.REDIRECT, 15001)}, egress=True
    )
    node.set_endpoint(b)
    b.shell.tcp_listen(8080)
    mark = 0x200 | (15001 << 16)
    run(
        "nft",
        "-f",
        "-",
        netns=node.netns,
        input=f"""
table inet fltest {{
  chain counting {{
    type filter hook forward priority 0; policy accept;
    meta mark {mark:#x} counter
  }}
}}
""",
    )
    # No TPROXY here: the marked packets are still forwarded, so the echo works.
    assert a.shell.tcp_echo(b.v4, 8080)["ok"]
    rules = json.loads(
        run("nft", "-j", "list", "table", "inet", "fltest", netns=node.netns).stdout
    )["nftables"]
    counter = next(
        e["counter"] for r in rules if "rule" in r for e in r["rule"]["expr"] if "counter" in e
    )
    assert counter["packets"] >= 3  # SYN, ACK, data, FIN: every packet A sends


def test_host_identity_needs_the_host_mark(node: Node, events: EventReader) -> None:
    b = node.b
    node.dp.maps.ipcache.set(f"{node.address}/32", 1)  # the node address is "host"
    node.apply(b, {key(b.ep_id, 1, False, TCP, 8080): Verdict.ALLOW}, ingress=True)
    b.shell.tcp_listen(8080)
    # Unmarked traffic from the node address is world (as SNATed traffic is).
    assert node.shell.tcp_echo(b.v4, 8080, timeout=DROP_WAIT)["error"] == "timeout"
    ev, _ = events.wait_for(lambda e: e.type == EventType.DROP and e.dport == 8080, 1.0)
    assert ev is not None and ev.src_identity == 2
    run(
        "nft",
        "-f",
        "-",
        netns=node.netns,
        input="""
table inet fltest {
  chain out {
    type filter hook output priority 0; policy accept;
    meta mark set meta mark | 0x00000c00
  }
}
""",
    )
    assert node.shell.tcp_echo(b.v4, 8080)["ok"]


def test_world_is_the_ipcache_miss(node: Node) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    node.apply(b, {key(b.ep_id, 2, False, UDP, 5353): Verdict.ALLOW}, ingress=True)
    b.shell.udp_listen(5353)
    assert not a.shell.udp_echo(b.v4, 5353, timeout=DROP_WAIT)["ok"]  # A is identity 1000
    node.dp.maps.ipcache.delete(f"{a.v4}/32")
    time.sleep(0.05)
    assert a.shell.udp_echo(b.v4, 5353)["ok"]  # unknown source: world
