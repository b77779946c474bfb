"""Local delivery: cached pod-to-pod flows go from from_pod straight into the other pod.

With ``DatapathConfig.local_delivery`` on, a packet that both ends' verdict caches pass
is handed by the source's from_pod to the destination pod with bpf_redirect_peer; the
host stack (routing, netfilter FORWARD) and the destination's to_pod never see it. An
nftables counter on the node's FORWARD hook tells which path each packet took; every
test also checks that the traffic itself still flows (a wrong IPv4 checksum after the
TTL rewrite, or wrong MAC addresses, would lose it).

Everything that is not fully cached on both ends takes the stack path, where to_pod
decides in full: new flows, flows after a generation bump (the stale-flow re-check),
flows of a deleted endpoint.
"""

# Fixtures come from conftest_bpf by explicit import, so test arguments shadow them:
# ruff: noqa: F811
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest_bpf import (  # noqa: F401 (fixtures, used by name)
    Node,
    _session_events,
    datapath,
    events,
    node,
    requires_root,
    run,
    session_datapath,
)

from flagella.datapath.events import DropReason, EventReader, EventType
from flagella.datapath.maps import CtEntry, CtKey, DatapathConfig, Direction, PolicyKey, Verdict

pytestmark = [pytest.mark.root, requires_root]

TCP = 6
ROUNDS = 20
_TABLE = "fl_local_delivery"


@pytest.fixture
def forward(node: Node) -> Iterator[Node]:
    """A counter on the node's FORWARD hook (in the node's own netns, removed with it)."""
    rules = (
        f"table inet {_TABLE} {{\n chain counted {{\n"
        "  type filter hook forward priority 0;\n  meta l4proto tcp counter\n }\n}\n"
    )
    run("nft", "-f", "-", netns=node.netns, input=rules)
    yield node


def forwarded_by_stack(node: Node) -> int:
    out = run("nft", "-j", "list", "chain", "inet", _TABLE, "counted", netns=node.netns).stdout
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise AssertionError("no counter in the forward chain")


def b_ingress_entry(node: Node) -> CtEntry:
    ct = node.dp.maps.ct.items()
    return next(e for k, e in ct.items() if k.ep_id == node.b.ep_id and not k.egress)


def allow_a_to_b(node: Node) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    node.apply(b, {PolicyKey(b.ep_id, a.identity, False, TCP, 8080, 0): Verdict.ALLOW}, ingress=True)


def exchange(node: Node, conn: int, rounds: int = ROUNDS) -> None:
    for i in range(rounds):
        assert node.a.shell.call("tcp_send_recv", conn=conn, data=f"m{i}" * 50, timeout=2)["ok"]


def connect(node: Node, addr: str) -> int:
    node.b.shell.tcp_listen(8080)
    r = node.a.shell.call("tcp_connect", addr=addr, port=8080, timeout=2)
    assert r["ok"], r
    conn: int = r["conn"]
    exchange(node, conn, 1)  # the handshake and one exchange fill both ends' caches
    return conn


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("family", [4, 6])
def test_cached_flows_skip_the_host_stack_only_when_on(forward: Node, on: bool, family: int) -> None:
    node = forward
    node.dp.maps.config.set(DatapathConfig(local_delivery=on))
    node.dp.maps.config.bump_generation()
    allow_a_to_b(node)
    conn = connect(node, node.b.v4 if family == 4 else node.b.v6)
    before = forwarded_by_stack(node)
    in_before = node.dp.maps.metrics.get(0, Direction.INGRESS).packets
    b_in = b_ingress_entry(node)
    exchange(node, conn)
    stack = forwarded_by_stack(node) - before
    if on:
        assert stack == 0  # requests and replies both went pod to pod
    else:
        assert stack >= 2 * ROUNDS
    # The destination's half was done either way: its CT entry and the ingress counter.
    b_in_after = b_ingress_entry(node)
    assert b_in_after.packets >= b_in.packets + ROUNDS
    assert node.dp.maps.metrics.get(0, Direction.INGRESS).packets >= in_before + 2 * ROUNDS


def test_new_flows_take_the_stack_and_to_pod_decides(forward: Node, events: EventReader) -> None:
    node = forward
    node.dp.maps.config.set(DatapathConfig(local_delivery=True))
    node.dp.maps.config.bump_generation()
    allow_a_to_b(node)
    node.b.shell.tcp_listen(8080, 8081)
    before = forwarded_by_stack(node)
    assert node.a.shell.tcp_echo(node.b.v4, 8080)["ok"]
    assert forwarded_by_stack(node) > before  # at least the SYN went through the stack
    # A port B's ingress does not allow: A's egress is unenforced and passes, B's to_pod drops.
    assert node.a.shell.tcp_echo(node.b.v4, 8081, timeout=0.5)["error"] == "timeout"
    ev, _ = events.wait_for(lambda e: e.type == EventType.DROP and e.dport == 8081, 1.0)
    assert ev is not None and ev.reason == DropReason.POLICY_DENIED
    assert ev.ep_id == node.b.ep_id


def test_a_policy_change_stops_a_locally_delivered_flow(forward: Node, events: EventReader) -> None:
    node = forward
    node.dp.maps.config.set(DatapathConfig(local_delivery=True))
    node.dp.maps.config.bump_generation()
    allow_a_to_b(node)
    conn = connect(node, node.b.v4)
    before = forwarded_by_stack(node)
    exchange(node, conn, 3)
    assert forwarded_by_stack(node) == before
    # B's ingress now denies A; after the bump the next packet is checked again by to_pod.
    node.apply(node.b, {}, ingress=True)
    node.dp.maps.config.bump_generation()
    r = node.a.shell.call("tcp_send_recv", conn=conn, data="late", timeout=0.5)
    assert r == {"ok": False, "error": "timeout"}
    ev, _ = events.wait_for(
        lambda e: e.type == EventType.DROP and e.ep_id == node.b.ep_id and e.dport == 8080, 1.0
    )
    assert ev is not None and ev.reason == DropReason.POLICY_DENIED
    tomb = node.dp.maps.ct.get(CtKey(node.b.ep_id, False, TCP, node.a.ipv4, node.b.ipv4,
                                     ev.sport, 8080))
    assert tomb is not None and tomb.flags & 0x8  # CT_F_DENIED


def test_a_deleted_endpoint_is_never_delivered_to(forward: Node) -> None:
    node = forward
    node.dp.maps.config.set(DatapathConfig(local_delivery=True))
    node.dp.maps.config.bump_generation()
    allow_a_to_b(node)
    conn = connect(node, node.b.v4)
    before = forwarded_by_stack(node)
    exchange(node, conn, 3)
    assert forwarded_by_stack(node) == before
    # B's endpoint entry goes (its CT entries stay, still cached): its device is not ours
    # any more, so A's packets take the stack again.
    node.dp.maps.endpoints.delete(node.b.ifindex)
    before = forwarded_by_stack(node)
    exchange(node, conn, 3)
    assert forwarded_by_stack(node) >= before + 3


def test_large_segments_are_delivered_locally_too(forward: Node) -> None:
    """A bulk send leaves the pod as GSO packets far above the MTU: the FIB lookup checks
    them GSO-aware, so they take the short path and arrive intact."""
    node = forward
    node.dp.maps.config.set(DatapathConfig(local_delivery=True))
    node.dp.maps.config.bump_generation()
    allow_a_to_b(node)
    conn = connect(node, node.b.v4)
    before = forwarded_by_stack(node)
    r = node.a.shell.call("tcp_send_recv", conn=conn, data="z" * 400_000, timeout=5)
    assert r["ok"]
    assert forwarded_by_stack(node) == before
