"""The verdict cache: conntrack entries remember the generation policy last passed them under.

An ESTABLISHED packet whose entry carries the config map's current generation passes
without the policy lookup; every bump of the generation sends the next packet of every
flow through the full lookup again, so a flow that policy now denies is dropped and its
entry deleted exactly as without the cache (see struct ct_entry in bpf/flagella.h).

The kernel tests drive the programs with BPF_PROG_TEST_RUN (root, real kernel); one
test does the same with an established TCP connection between pod namespaces. The last
tests check, over the in-memory twin, that the agent bumps the generation after every
map write.
"""

# Fixtures come from conftest_bpf by explicit import, so test arguments shadow them:
# ruff: noqa: F811
from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from conftest_bpf import (  # noqa: F401 (fixtures, used by name)
    Node,
    _session_events,
    datapath,
    events,
    is_tombstone,
    node,
    requires_root,
    session_datapath,
)
from test_bpf_testrun import (
    ACK,
    EP,
    ICMP,
    ID,
    OK,
    PEER4,
    PEER_ID,
    POD4,
    POD6,
    SHOT,
    SYN,
    TCP,
    UDP,
    endpoint,
    frame4,
    icmp,
    into,
    out,
    tcp,
    udp,
)

from flagella.agent.core import AgentCore
from flagella.agent.settings import AgentSettings
from flagella.datapath.events import CtState, DropReason, EventReader, EventType
from flagella.datapath.loader import LoadedBuild
from flagella.datapath.maps import (
    CtEntry,
    CtFlags,
    CtKey,
    DatapathConfig,
    DatapathMaps,
    Direction,
    EndpointRow,
    PolicyKey,
    PolicyValue,
    Verdict,
)
from flagella.datapath.port import MemoryDatapath

ALLOW_80 = PolicyKey(EP, PEER_ID, True, TCP, 80)
FLOW = CtKey(EP, True, TCP, POD4, PEER4, 40000, 80)


@pytest.fixture
def dp(datapath: LoadedBuild) -> Iterator[LoadedBuild]:
    datapath.maps.ipcache.set(f"{PEER4}/32", PEER_ID)
    yield datapath


def syn() -> bytes:
    return frame4(POD4, PEER4, TCP, tcp(40000, 80, SYN))


def ack() -> bytes:
    return frame4(POD4, PEER4, TCP, tcp(40000, 80, ACK))


def entry(dp: LoadedBuild, key: CtKey = FLOW) -> CtEntry | None:
    return dp.maps.ct.get(key)


# --- kernel: BPF_PROG_TEST_RUN ------------------------------------------------------------


@pytest.mark.root
@requires_root
def test_generation_zero_never_caches(dp: LoadedBuild) -> None:
    """A fresh config map (generation 0): every packet is checked, as before the cache."""
    endpoint(dp, {ALLOW_80: Verdict.ALLOW}, egress=True)
    assert dp.maps.config.generation == 0
    assert out(dp, syn()) == OK and out(dp, ack()) == OK and out(dp, ack()) == OK
    e = entry(dp)
    assert e is not None and e.verdict_gen == 0
    assert dp.maps.policy.get(ALLOW_80).packets == 3  # every packet evaluated


@pytest.mark.root
@requires_root
def test_cached_flow_is_rechecked_after_a_bump_and_dropped_if_now_denied(
    dp: LoadedBuild, events: EventReader
) -> None:
    endpoint(dp, {ALLOW_80: Verdict.ALLOW}, egress=True)
    gen = dp.maps.config.bump_generation()
    assert gen != 0
    assert out(dp, syn()) == OK
    e = entry(dp)
    assert e is not None and e.verdict_gen == gen and e.packets == 1
    assert out(dp, ack()) == OK and out(dp, ack()) == OK
    e = entry(dp)
    assert e is not None and e.packets == 3 and e.flags == CtFlags.SEEN_NON_SYN  # touched
    assert dp.maps.policy.get(ALLOW_80).packets == 1  # only the first packet was looked up

    # Without a bump the cache holds (what the agent never does: it bumps after writing).
    dp.maps.policy.delete(ALLOW_80)
    assert out(dp, ack()) == OK
    # The bump: the next packet takes the full lookup, is dropped, and the entry goes.
    gen2 = dp.maps.config.bump_generation()
    assert gen2 not in (0, gen)
    assert out(dp, ack()) == SHOT
    assert is_tombstone(entry(dp))
    drop = [ev for ev in events.read() if ev.type == EventType.DROP]
    assert [(ev.reason, ev.ct_state, ev.dport) for ev in drop] == [
        (DropReason.POLICY_DENIED, CtState.ESTABLISHED, 80)
    ]
    assert out(dp, ack()) == SHOT and out(dp, syn()) == SHOT


@pytest.mark.root
@requires_root
def test_a_bump_rechecks_allowed_flows_and_caches_them_again(dp: LoadedBuild) -> None:
    endpoint(dp, {ALLOW_80: Verdict.ALLOW}, egress=True)
    dp.maps.config.bump_generation()
    assert out(dp, syn()) == OK and out(dp, ack()) == OK
    gen2 = dp.maps.config.bump_generation()
    assert out(dp, ack()) == OK  # checked again: still allowed
    e = entry(dp)
    assert e is not None and e.verdict_gen == gen2
    assert dp.maps.policy.get(ALLOW_80).packets == 2
    assert out(dp, ack()) == OK
    assert dp.maps.policy.get(ALLOW_80).packets == 2  # cached again


@pytest.mark.root
@requires_root
def test_every_map_change_takes_effect_on_established_flows_after_a_bump(dp: LoadedBuild) -> None:
    """Endpoint rows (enforcement) and the ipcache (the peer's identity) count as much as
    policy entries."""
    endpoint(dp, {ALLOW_80: Verdict.ALLOW}, egress=True)
    dp.maps.config.bump_generation()
    assert out(dp, syn()) == OK and out(dp, ack()) == OK
    # The peer becomes another identity: no entry allows it.
    dp.maps.ipcache.set(f"{PEER4}/32", PEER_ID + 1)
    assert out(dp, ack()) == OK  # cached
    dp.maps.config.bump_generation()
    assert out(dp, ack()) == SHOT and is_tombstone(entry(dp))

    # Enforcement switched on for a direction that had none.
    dp.maps.ipcache.set(f"{PEER4}/32", PEER_ID)
    endpoint(dp, {ALLOW_80: Verdict.ALLOW}, egress=False)
    dp.maps.config.bump_generation()
    flow = CtKey(EP, True, UDP, POD4, PEER4, 5000, 53)
    dns = frame4(POD4, PEER4, UDP, udp(5000, 53))
    assert out(dp, dns) == OK and out(dp, dns) == OK
    assert entry(dp, flow) is not None
    endpoint(dp, {ALLOW_80: Verdict.ALLOW}, egress=True)
    assert out(dp, dns) == OK  # cached
    dp.maps.config.bump_generation()
    assert out(dp, dns) == SHOT and is_tombstone(entry(dp, flow))


@pytest.mark.root
@requires_root
def test_a_tampered_entry_is_noticed_at_the_next_bump(dp: LoadedBuild) -> None:
    """A CT entry forged to carry the current generation for a flow policy denies passes
    (the cache trusts conntrack, as the datapath always has) until the next bump."""
    endpoint(dp, {ALLOW_80: Verdict.ALLOW}, egress=True)
    gen = dp.maps.config.bump_generation()
    forged = CtKey(EP, True, TCP, POD4, PEER4, 40001, 22)
    frame = frame4(POD4, PEER4, TCP, tcp(40001, 22, ACK))
    assert out(dp, frame) == SHOT  # policy denies port 22
    far = 2**62
    dp.maps.ct.put(forged, CtEntry(far, 0, 0, CtFlags.SEEN_NON_SYN, verdict_gen=gen))
    assert out(dp, frame) == OK
    dp.maps.config.bump_generation()
    assert out(dp, frame) == SHOT
    assert is_tombstone(entry(dp, forged))


@pytest.mark.root
@requires_root
def test_redirected_flows_are_never_cached(dp: LoadedBuild) -> None:
    """The proxy mark is needed on every packet."""
    redirect = PolicyKey(EP, PEER_ID, True, TCP, 80)
    endpoint(dp, {redirect: (Verdict.REDIRECT, 15001)}, egress=True)
    dp.maps.config.bump_generation()
    mark = 0x200 | 15001 << 16
    assert dp.test_run("from_pod", syn()).mark == mark
    e = entry(dp)
    assert e is not None and e.verdict_gen == 0
    for _ in range(2):
        r = dp.test_run("from_pod", ack())
        assert r.passed and r.mark == mark
    assert dp.maps.policy.get(redirect).packets == 3
    # An allow cached before the entry became a redirect is cleared by the redirect.
    dp.maps.policy.set(redirect, Verdict.ALLOW)
    dp.maps.config.bump_generation()
    assert dp.test_run("from_pod", ack()).mark == 0
    assert entry(dp).verdict_gen != 0  # type: ignore[union-attr]
    dp.maps.policy.set(redirect, Verdict.REDIRECT, 15001)
    dp.maps.config.bump_generation()
    assert dp.test_run("from_pod", ack()).mark == mark
    assert entry(dp).verdict_gen == 0  # type: ignore[union-attr]


@pytest.mark.root
@requires_root
def test_host_marked_packets_neither_use_nor_fill_the_cache(dp: LoadedBuild) -> None:
    """Towards a pod the host mark, not the address, makes the peer the host: a verdict
    cached for the tuple says nothing about a marked packet, and the other way round."""
    endpoint(dp, {PolicyKey.any_port(EP, PEER_ID, False): Verdict.ALLOW}, ingress=True)
    dp.maps.config.bump_generation()
    flow = CtKey(EP, False, TCP, PEER4, POD4, 40000, 80)
    inbound = frame4(PEER4, POD4, TCP, tcp(40000, 80, ACK))
    assert into(dp, inbound) == OK and into(dp, inbound) == OK  # cached
    assert entry(dp, flow).verdict_gen != 0  # type: ignore[union-attr]
    assert into(dp, inbound, mark=0xC00) == SHOT  # the host may not enter
    assert is_tombstone(entry(dp, flow))

    host_flow = CtKey(EP, False, TCP, PEER4, POD4, 40001, 80)
    host_frame = frame4(PEER4, POD4, TCP, tcp(40001, 80, ACK))
    dp.maps.policy.set(PolicyKey.any_port(EP, 1, False), Verdict.ALLOW)
    dp.maps.policy.delete(PolicyKey.any_port(EP, PEER_ID, False))
    dp.maps.config.bump_generation()
    assert into(dp, host_frame, mark=0xC00) == OK and into(dp, host_frame, mark=0xC00) == OK
    assert entry(dp, host_flow).verdict_gen == 0  # type: ignore[union-attr]
    assert into(dp, host_frame) == SHOT  # unmarked: the peer's own identity, not allowed


@pytest.mark.root
@requires_root
def test_echo_replies_sharing_an_echo_request_tuple_are_checked(dp: LoadedBuild) -> None:
    """An echo request and an echo reply with the same id share a conntrack tuple, but
    policy sees different ICMP types."""
    endpoint(dp, {PolicyKey(EP, PEER_ID, True, ICMP, 8): Verdict.ALLOW}, egress=True)
    dp.maps.config.bump_generation()
    request = frame4(POD4, PEER4, ICMP, icmp(8, ident=9))
    assert out(dp, request) == OK and out(dp, request) == OK
    flow = CtKey(EP, True, ICMP, POD4, PEER4, 9, 9)
    assert entry(dp, flow).verdict_gen != 0  # type: ignore[union-attr]
    assert out(dp, frame4(POD4, PEER4, ICMP, icmp(0, ident=9))) == SHOT


@pytest.mark.root
@requires_root
def test_ipv6_flows_are_cached_too(dp: LoadedBuild) -> None:
    from test_bpf_testrun import PEER6, frame6

    dp.maps.ipcache.set(f"{PEER6}/128", PEER_ID)
    endpoint(dp, {ALLOW_80: Verdict.ALLOW}, egress=True)
    dp.maps.config.bump_generation()
    f = frame6(POD6, PEER6, TCP, tcp(40000, 80, ACK))
    assert out(dp, f) == OK and out(dp, f) == OK
    assert dp.maps.policy.get(ALLOW_80).packets == 1
    dp.maps.endpoints.set(1, EndpointRow(EP, ID, False, True, 0, 0, POD4, POD6))  # mask: no probe
    dp.maps.config.bump_generation()
    assert out(dp, f) == SHOT


# --- kernel: real traffic -------------------------------------------------------------------


@pytest.mark.root
@requires_root
def test_established_connection_dropped_at_its_next_packet_after_a_bump(
    node: Node, events: EventReader
) -> None:
    a, b = node.a, node.b
    node.set_endpoint(a)
    allow = PolicyKey(b.ep_id, a.identity, False, TCP, 8080)
    # B's egress is enforced too (nothing allowed: its packets pass only as replies), or
    # B's own next packet (a retransmission of an echo whose ACK was dropped) would open
    # a new egress flow once the entry is gone, and A's packets would pass as its replies.
    node.apply(b, {allow: Verdict.ALLOW}, ingress=True, egress=True)
    gen = node.dp.maps.config.bump_generation()
    b.shell.tcp_listen(8080)
    conn = a.shell.call("tcp_connect", addr=b.v4, port=8080, timeout=2)
    assert conn["ok"]
    for data in ("one", "two", "three"):
        assert a.shell.call("tcp_send_recv", conn=conn["conn"], data=data, timeout=2)["ok"]
    flow = CtKey(b.ep_id, False, TCP, a.ipv4, b.ipv4, conn["sport"], 8080)
    e = node.dp.maps.ct.get(flow)
    assert e is not None and e.verdict_gen == gen and e.packets >= 4
    assert node.dp.maps.policy.get(allow).packets < e.packets  # the rest came from the cache

    node.dp.maps.policy.delete(allow)
    node.dp.maps.config.bump_generation()
    r = a.shell.call("tcp_send_recv", conn=conn["conn"], data="four", timeout=0.5)
    assert r == {"ok": False, "error": "timeout"}
    assert is_tombstone(node.dp.maps.ct.get(flow))
    ev, _ = events.wait_for(
        lambda e: e.type == EventType.DROP and e.ct_state == CtState.ESTABLISHED, 1.0
    )
    assert ev is not None and ev.sport == conn["sport"] and ev.dport == 8080
    a.shell.call("tcp_close", conn=conn["conn"])


# --- the generation in the config map (in memory: no root) ---------------------------------


def test_generation_survives_config_writes_and_never_returns() -> None:
    maps = DatapathMaps.in_memory()
    assert maps.config.generation == 0
    first = maps.config.bump_generation()
    assert first != 0
    maps.config.set(DatapathConfig(ct_tcp_ns=1, trace_new_flows=True))
    assert maps.config.generation == first
    assert maps.config.get() == DatapathConfig(ct_tcp_ns=1, trace_new_flows=True)
    assert maps.config.bump_generation() == (first + 1) & 0xFFFFFFFF or 1
    maps.clear()  # with the conntrack entries: back to "no caching"
    assert maps.config.generation == 0 and maps.config.get() == DatapathConfig()


def test_generation_skips_zero_when_it_wraps() -> None:
    maps = DatapathMaps.in_memory()
    maps.config.bump_generation()
    raw = maps.config._raw()
    raw.generation = 0xFFFFFFFF
    maps.config.backend.update(maps.config._KEY, bytes(raw))
    assert maps.config.bump_generation() == 1


# --- the agent bumps after every map write (in memory) ---------------------------------------


class RecordingDatapath(MemoryDatapath):
    """Logs map writes and bumps in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []
        self.endpoints = _Logged(self.log, "endpoints")  # type: ignore[assignment]
        self.policy = _Logged(self.log, "policy")  # type: ignore[assignment]
        self.ipcache = _Logged(self.log, "ipcache")  # type: ignore[assignment]

    def bump_generation(self) -> None:
        super().bump_generation()
        self.log.append("bump")

    def unbumped_writes(self) -> list[str]:
        """Writes after the last bump."""
        tail = (
            self.log[len(self.log) - self.log[::-1].index("bump") :]
            if "bump" in self.log
            else self.log
        )
        return tail


class _Logged(dict):  # type: ignore[type-arg]
    def __init__(self, log: list[str], name: str) -> None:
        super().__init__()
        self._log, self._name = log, name

    def __setitem__(self, k: Any, v: Any) -> None:
        self._log.append(self._name)
        super().__setitem__(k, v)

    def __delitem__(self, k: Any) -> None:
        self._log.append(self._name)
        super().__delitem__(k)

    def pop(self, k: Any, *default: Any) -> Any:
        if k in self:
            self._log.append(self._name)
        return super().pop(k, *default)

    def update(self, *a: Any, **kw: Any) -> None:
        self._log.append(self._name)
        super().update(*a, **kw)


POLICY = yaml.safe_load("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromCIDR: [192.0.2.0/24]
""")


def test_the_agent_bumps_the_generation_after_every_map_write(tmp_path: Any) -> None:
    dp = RecordingDatapath()
    core = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)

    def step(what: str, fn: Any, *args: Any, **kw: Any) -> None:
        dp.log.clear()
        fn(*args, **kw)
        assert core.wait_idle() == []  # regenerations run in the pipeline's workers
        assert dp.unbumped_writes() == [], f"{what}: writes after the last bump: {dp.log}"

    step("restore", core.restore)
    step("create server", core.create_endpoint, "server", labels={"app": "server"})
    step("create client", core.create_endpoint, "client", labels={"app": "client"})
    assert "bump" in dp.log
    step("import", core.import_policies, [POLICY])
    assert "policy" in dp.log and "ipcache" in dp.log  # the CIDR identity
    step("relabel", core.set_endpoint_labels, "client", {"app": "other"}, [])
    step("namespace labels", core.set_namespace_labels, "default", {"team": "a"}, [])
    step("delete policy", core.delete_policies, ["rule1"])
    step("delete endpoint", core.delete_endpoint, "client")
    # Drift (a stray policy entry, a missing ipcache entry): repaired, then bumped.
    dp.policy[PolicyKey(4242, 4242, False, 6, 22, 0)] = PolicyValue(Verdict.ALLOW)
    dp.ipcache.pop(ipaddress.ip_network(core.find("server").ipv4))
    step("sync_all", core.sync_all)
    assert dp.log[-1] == "bump"
    dp.log.clear()
    assert core.sync_all() == 0 and dp.log == []  # nothing to repair: no bump
    core.close()


# --- a deny stops both directions (replies are checked again after a bump) ----------------------


@pytest.mark.root
@requires_root
def test_a_reply_is_rechecked_after_a_bump_and_the_denied_flow_stays_closed(dp: LoadedBuild) -> None:
    """Ingress enforced, egress not: the pod's replies and its retries must not reopen a flow
    that its ingress policy now denies."""
    allow_in = PolicyKey(EP, PEER_ID, False, TCP, 80)
    endpoint(dp, {allow_in: Verdict.ALLOW}, ingress=True)
    dp.maps.config.bump_generation()
    request = frame4(PEER4, POD4, TCP, tcp(40000, 80, ACK))
    reply = frame4(POD4, PEER4, TCP, tcp(80, 40000, ACK))
    flow = CtKey(EP, False, TCP, PEER4, POD4, 40000, 80)
    assert into(dp, frame4(PEER4, POD4, TCP, tcp(40000, 80, SYN))) == OK
    assert out(dp, reply) == OK and into(dp, request) == OK

    dp.maps.policy.delete(allow_in)
    dp.maps.config.bump_generation()
    # The pod speaks first after the change: its reply meets the flow's (ingress) policy.
    assert out(dp, reply) == SHOT
    assert is_tombstone(entry(dp, flow))
    # Nothing reopens it: not the pod's next packet (no fresh egress entry)...
    assert out(dp, reply) == SHOT
    assert entry(dp, CtKey(EP, True, TCP, POD4, PEER4, 80, 40000)) is None
    # ...nor the peer's.
    assert into(dp, request) == SHOT
    assert dp.maps.metrics.get(DropReason.POLICY_DENIED, Direction.EGRESS).packets == 2

    # Allowed again: the next generation revives the flow from either side.
    endpoint(dp, {allow_in: Verdict.ALLOW}, ingress=True)
    dp.maps.config.bump_generation()
    assert out(dp, reply) == OK
    e = entry(dp, flow)
    assert e is not None and not (e.flags & CtFlags.DENIED)
    assert into(dp, request) == OK
