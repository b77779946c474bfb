"""The datapath on crafted packets through BPF_PROG_TEST_RUN (root, real kernel).

For what real traffic cannot easily produce: IPv6 extension headers and
fragments, truncated headers, a later IPv4 fragment without its first, ICMP
errors, conntrack lifetimes and TCP state, unknown protocols. The endpoint is
registered under ifindex 1, which is what the kernel gives the program in a
test run (loopback), so no device is involved.
"""

# Fixtures come from conftest_bpf by explicit import, so test arguments shadow them:
# ruff: noqa: F811
from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Iterator

import pytest
from conftest_bpf import (  # noqa: F401 (fixtures, used by name)
    _session_events,
    datapath,
    events,
    requires_root,
    session_datapath,
)

from flagella.datapath.events import CtState, DropReason, EventReader, EventType
from flagella.datapath.loader import LoadedBuild
from flagella.datapath.maps import (
    CtFlags,
    CtKey,
    DatapathConfig,
    Direction,
    EndpointRow,
    Frag6Key,
    PolicyKey,
    Verdict,
    wild_mask,
)

pytestmark = [pytest.mark.root, requires_root]

OK, SHOT = 0, 2
EP, ID, PEER_ID = 7, 300, 400
POD4, PEER4 = ipaddress.IPv4Address("10.244.1.1"), ipaddress.IPv4Address("10.244.1.2")
POD6 = ipaddress.IPv6Address("fd00:10:244::101")
PEER6 = ipaddress.IPv6Address("fd00:10:244::102")
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
SYN, ACK, FIN = 0x02, 0x10, 0x01


# --- packet builders (checksums are not checked by the datapath) ---------------------------


def eth(ethertype: int) -> bytes:
    return b"\x02\0\0\0\0\x01" + b"\x02\0\0\0\0\x02" + struct.pack("!H", ethertype)


def ipv4(
    src: ipaddress.IPv4Address,
    dst: ipaddress.IPv4Address,
    proto: int,
    payload: bytes,
    ident: int = 1,
    frag: int = 0,
) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident,
        frag,
        64,
        proto,
        0,
        src.packed,
        dst.packed,
    )
    return hdr + payload


def ipv6(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, nh: int, payload: bytes) -> bytes:
    return (
        struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64, src.packed, dst.packed) + payload
    )


def tcp(sport: int, dport: int, flags: int = SYN) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(type_: int, code: int = 0, ident: int = 0, rest: bytes = b"") -> bytes:
    return struct.pack("!BBHHH", type_, code, 0, ident, 1) + rest


def ext(nh: int) -> bytes:
    """A hop-by-hop/routing/destination-options header of 8 bytes."""
    return struct.pack("!BB6s", nh, 0, b"\0" * 6)


def frame4(
    src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, proto: int, l4: bytes, **kw: int
) -> bytes:
    return eth(0x0800) + ipv4(src, dst, proto, l4, **kw)


def frame6(
    src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, nh: int, payload: bytes
) -> bytes:
    return eth(0x86DD) + ipv6(src, dst, nh, payload)


# --- setup -------------------------------------------------------------------------------


@pytest.fixture
def dp(datapath: LoadedBuild) -> Iterator[LoadedBuild]:
    datapath.maps.ipcache.set(f"{PEER4}/32", PEER_ID)
    datapath.maps.ipcache.set(f"{PEER6}/128", PEER_ID)
    yield datapath


def endpoint(
    dp: LoadedBuild,
    entries: dict[PolicyKey, Verdict | tuple[Verdict, int]] | None = None,
    *,
    ingress: bool = False,
    egress: bool = False,
) -> None:
    desired = {k: v if isinstance(v, tuple) else (v, 0) for k, v in (entries or {}).items()}
    dp.maps.policy.sync_endpoint(EP, desired)
    dp.maps.endpoints.set(
        1,
        EndpointRow(
            EP, ID, ingress, egress, wild_mask(desired, False), wild_mask(desired, True), POD4, POD6
        ),
    )


def out(dp: LoadedBuild, frame: bytes, mark: int = 0) -> int:
    """A packet leaving the pod (from_pod)."""
    return dp.test_run("from_pod", frame, mark=mark).verdict


def into(dp: LoadedBuild, frame: bytes, mark: int = 0) -> int:
    """A packet entering the pod (to_pod)."""
    return dp.test_run("to_pod", frame, mark=mark).verdict


def dropped(dp: LoadedBuild, reason: int, direction: Direction) -> int:
    return dp.maps.metrics.get(reason, direction).packets


# --- tests -------------------------------------------------------------------------------


def test_not_an_endpoint_passes_untouched(dp: LoadedBuild) -> None:
    assert out(dp, frame4(PEER4, POD4, TCP, tcp(1, 2))) == OK
    assert dp.maps.metrics.read() == {}


def test_non_ip_passes(dp: LoadedBuild) -> None:
    endpoint(dp, ingress=True, egress=True)
    arp = eth(0x0806) + b"\0\x01\x08\0\x06\x04\0\x01" + b"\0" * 20
    assert out(dp, arp) == OK and into(dp, arp) == OK


def test_neighbour_discovery_passes_enforced_directions(dp: LoadedBuild) -> None:
    endpoint(dp, ingress=True, egress=True)
    ll = ipaddress.IPv6Address("fe80::2")
    ns = frame6(ll, ipaddress.IPv6Address("ff02::1:ff00:1"), ICMPV6, icmp(135) + b"\0" * 16)
    unspecified = frame6(
        ipaddress.IPv6Address("::"), ipaddress.IPv6Address("ff02::16"), ICMPV6, icmp(143)
    )
    assert out(dp, ns) == OK and out(dp, unspecified) == OK and into(dp, ns) == OK


def test_truncated_headers_are_invalid(dp: LoadedBuild) -> None:
    # (A cut IP header cannot be fed: the test-run path itself refuses it.)
    endpoint(dp)
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1000, 80)[:8])) == SHOT
    assert out(dp, frame4(POD4, PEER4, ICMP, icmp(8)[:6])) == SHOT
    assert out(dp, frame6(POD6, PEER6, UDP, b"\0\x35")) == SHOT
    assert dropped(dp, DropReason.INVALID_PACKET, Direction.EGRESS) == 3


def test_ipv6_extension_headers_are_walked(dp: LoadedBuild) -> None:
    endpoint(dp, {PolicyKey(EP, PEER_ID, True, TCP, 80): Verdict.ALLOW}, egress=True)
    ah = struct.pack("!BB10s", TCP, 1, b"\0" * 10)  # AH: (1 + 2) * 4 = 12 bytes
    chain = ext(43) + ext(60) + struct.pack("!BB6s", 51, 0, b"\0" * 6)
    assert out(dp, frame6(POD6, PEER6, 0, chain + ah + tcp(1000, 80))) == OK
    assert out(dp, frame6(POD6, PEER6, 0, chain + ah + tcp(1000, 81))) == SHOT
    assert dropped(dp, DropReason.POLICY_DENIED, Direction.EGRESS) == 1


def test_too_many_ipv6_extension_headers(dp: LoadedBuild) -> None:
    endpoint(dp)
    five = ext(60) + ext(60) + ext(60) + ext(60) + ext(TCP)
    assert out(dp, frame6(POD6, PEER6, 0, five + tcp(1000, 80))) == SHOT
    assert dropped(dp, DropReason.INVALID_IPV6_EXT, Direction.EGRESS) == 1


def test_vlan_tagged_and_non_ip_frames_drop_and_arp_passes(dp: LoadedBuild, events: EventReader) -> None:
    endpoint(dp)  # no policy: every IP packet would pass
    inner = ipv4(POD4, PEER4, UDP, udp(1000, 53))
    mac = b"\x02\0\0\0\0\x01" + b"\x02\0\0\0\0\x02"
    assert out(dp, eth(0x0800) + inner) == OK
    for tpids in ((0x8100,), (0x88A8, 0x8100), (0x8100, 0x8100)):
        tags = b"".join(struct.pack("!HH", t, 0) for t in tpids)
        frame = mac + tags + struct.pack("!H", 0x0800) + inner
        assert out(dp, frame) == SHOT, tpids
        assert into(dp, frame) == SHOT, tpids
    for ethertype in (0x88B5, 0x8847, 0x8863, 0x0842):  # local, MPLS, PPPoE, wake-on-LAN
        assert out(dp, eth(ethertype) + b"\0" * 46) == SHOT, hex(ethertype)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac[6:], POD4.packed, b"\0" * 6, PEER4.packed)
    assert out(dp, eth(0x0806) + arp) == OK and into(dp, eth(0x0806) + arp) == OK
    assert dropped(dp, DropReason.UNSUPPORTED_L2, Direction.EGRESS) == 7
    assert dropped(dp, DropReason.UNSUPPORTED_L2, Direction.INGRESS) == 3
    assert {e.reason_text for e in events.read()} == {"Unsupported L2 protocol"}


def test_ipv6_fragments_follow_their_first(dp: LoadedBuild, events: EventReader) -> None:
    endpoint(dp, {PolicyKey(EP, PEER_ID, True, UDP, 53): Verdict.ALLOW}, egress=True)
    first = struct.pack("!BBHI", UDP, 0, 1, 99)  # offset 0, M flag, id 99
    later = struct.pack("!BBHI", UDP, 0, (185 << 3), 99)  # offset 1480, last
    # A later fragment before its first: nothing to follow.
    assert out(dp, frame6(POD6, PEER6, 44, later + b"x" * 64)) == SHOT
    assert [e.reason for e in events.read()] == [175]
    # The first fragment meets policy with its ports, then its later fragments pass.
    assert out(dp, frame6(POD6, PEER6, 44, first + udp(1000, 53))) == OK
    assert out(dp, frame6(POD6, PEER6, 44, later + b"x" * 64)) == OK
    # Another datagram's first fragment to a denied port: its later fragments drop.
    first_denied = struct.pack("!BBHI", UDP, 0, 1, 100)
    later_denied = struct.pack("!BBHI", UDP, 0, (185 << 3), 100)
    assert out(dp, frame6(POD6, PEER6, 44, first_denied + udp(1000, 54))) == SHOT
    assert out(dp, frame6(POD6, PEER6, 44, later_denied + b"x" * 64)) == SHOT
    assert [e.reason for e in events.read()] == [133, 175]
    key = Frag6Key(EP, True, UDP, 99, POD6, PEER6)
    assert dp.maps.frag6.items() == {key: (1000, 53)}


def test_later_ipv4_fragment_needs_its_first(dp: LoadedBuild, events: EventReader) -> None:
    endpoint(dp, {PolicyKey(EP, PEER_ID, True, UDP, 53): Verdict.ALLOW}, egress=True)
    later = frame4(POD4, PEER4, UDP, b"x" * 64, ident=77, frag=185)
    assert out(dp, later) == SHOT
    ev = events.read()[-1]
    assert ev.reason == DropReason.FRAG_NOT_FOUND
    assert ev.reason_text == "First logical datagram fragment not found"

    first = frame4(POD4, PEER4, UDP, udp(4000, 53, b"y" * 64), ident=77, frag=0x2000)
    assert out(dp, first) == OK
    assert out(dp, later) == OK
    assert list(dp.maps.frag4.items().values()) == [(4000, 53)]
    # A first fragment that policy denies records nothing: its followers are dropped too.
    assert out(dp, frame4(POD4, PEER4, UDP, udp(4000, 54, b"y"), ident=78, frag=0x2000)) == SHOT
    assert out(dp, frame4(POD4, PEER4, UDP, b"x" * 64, ident=78, frag=185)) == SHOT
    assert dropped(dp, DropReason.FRAG_NOT_FOUND, Direction.EGRESS) == 2


def test_icmp_errors_of_tracked_flows_are_related(dp: LoadedBuild) -> None:
    endpoint(dp, ingress=True)  # nothing may enter, egress is open
    assert out(dp, frame4(POD4, PEER4, UDP, udp(5000, 53))) == OK
    embedded = ipv4(POD4, PEER4, UDP, udp(5000, 53))
    unreachable = frame4(PEER4, POD4, ICMP, icmp(3, 3, rest=embedded))
    assert into(dp, unreachable) == OK
    other = frame4(PEER4, POD4, ICMP, icmp(3, 3, rest=ipv4(POD4, PEER4, UDP, udp(5000, 54))))
    assert into(dp, other) == SHOT

    assert out(dp, frame6(POD6, PEER6, UDP, udp(5000, 53))) == OK
    too_big = frame6(PEER6, POD6, ICMPV6, icmp(2, rest=ipv6(POD6, PEER6, UDP, udp(5000, 53))))
    assert into(dp, too_big) == OK


def test_echo_requests_never_count_as_replies(dp: LoadedBuild) -> None:
    endpoint(dp, ingress=True)
    assert out(dp, frame4(POD4, PEER4, ICMP, icmp(8, ident=9))) == OK
    assert into(dp, frame4(PEER4, POD4, ICMP, icmp(0, ident=9))) == OK  # the reply
    assert into(dp, frame4(PEER4, POD4, ICMP, icmp(8, ident=9))) == SHOT  # not a reply
    assert into(dp, frame4(PEER4, POD4, ICMP, icmp(0, ident=10))) == SHOT  # other id


def test_unknown_protocols_are_evaluated_with_port_zero(dp: LoadedBuild) -> None:
    endpoint(
        dp,
        {
            PolicyKey.any_port(EP, PEER_ID, True, 47): Verdict.ALLOW,
            PolicyKey(EP, PEER_ID, True, 132, 0): Verdict.ALLOW,
        },
        egress=True,
    )
    assert out(dp, frame4(POD4, PEER4, 47, b"\0" * 8)) == OK  # GRE, any port
    assert out(dp, frame4(POD4, PEER4, 4, b"\0" * 20)) == SHOT  # IPIP: no entry
    # SCTP has ports: only destination port 0 is allowed here.
    assert out(dp, frame4(POD4, PEER4, 132, struct.pack("!HH", 1, 0) + b"\0" * 8)) == OK
    assert out(dp, frame4(POD4, PEER4, 132, struct.pack("!HH", 1, 5) + b"\0" * 8)) == SHOT


def test_wildcard_probes_follow_the_endpoint_mask(dp: LoadedBuild) -> None:
    k = PolicyKey(EP, PEER_ID, True, TCP, 8080, 2)
    endpoint(dp, {k: Verdict.ALLOW}, egress=True)
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1000, 8083))) == OK
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1000, 8084))) == SHOT
    # The same entry without its mask bit is never probed.
    dp.maps.endpoints.set(1, EndpointRow(EP, ID, False, True, 0, 0, POD4, POD6))
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1001, 8083))) == SHOT


def test_verdict_combination_and_counters(dp: LoadedBuild) -> None:
    exact = PolicyKey(EP, PEER_ID, True, TCP, 443)
    anyone = PolicyKey(EP, 0, True, TCP, 443)
    anything = PolicyKey.any_port(EP, PEER_ID, True)
    endpoint(
        dp,
        {exact: Verdict.ALLOW, anyone: (Verdict.REDIRECT, 15001), anything: Verdict.ALLOW},
        egress=True,
    )
    r = dp.test_run("from_pod", frame4(POD4, PEER4, TCP, tcp(1000, 443)))
    assert r.passed and r.mark == 0x200 | 15001 << 16  # REDIRECT beats ALLOW
    assert dp.maps.policy.get(anyone).packets == 1
    assert dp.maps.policy.get(exact).packets == 0
    r = dp.test_run("from_pod", frame4(POD4, PEER4, UDP, udp(1000, 53)))
    assert r.passed and r.mark == 0
    assert dp.maps.policy.get(anything).packets == 1
    frame_len = 14 + 20 + 8
    assert dp.maps.policy.get(anything).bytes == frame_len
    dp.maps.policy.set(PolicyKey(EP, 0, True, 0, 0, 16), Verdict.DENY)
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1001, 443))) == SHOT  # DENY beats all


def test_host_mark_gives_the_host_identity(dp: LoadedBuild, events: EventReader) -> None:
    endpoint(dp, {PolicyKey.any_port(EP, 1, False): Verdict.ALLOW}, ingress=True)
    stranger = ipaddress.IPv4Address("192.0.2.77")
    assert into(dp, frame4(stranger, POD4, TCP, tcp(1000, 80)), mark=0xC00) == OK
    assert into(dp, frame4(stranger, POD4, TCP, tcp(1001, 80))) == SHOT
    ev = events.read()[-1]
    assert (ev.src_identity, ev.dst_identity) == (2, ID)


def test_non_tcp_lifetime_and_expiry(dp: LoadedBuild) -> None:
    dp.maps.config.set(DatapathConfig(ct_non_tcp_ns=200_000_000))
    endpoint(dp, ingress=True)
    assert out(dp, frame4(POD4, PEER4, UDP, udp(5000, 53))) == OK
    entry = dp.maps.ct.get(CtKey(EP, True, UDP, POD4, PEER4, 5000, 53))
    assert entry is not None
    assert 0 < entry.expires_ns - time.monotonic_ns() <= 200_000_000
    assert into(dp, frame4(PEER4, POD4, UDP, udp(53, 5000))) == OK
    time.sleep(0.25)
    assert into(dp, frame4(PEER4, POD4, UDP, udp(53, 5000))) == SHOT  # expired = absent
    assert dp.maps.ct.gc(time.monotonic_ns()) == 1


def test_tcp_lifetimes_follow_the_handshake_and_close(dp: LoadedBuild) -> None:
    s = 1_000_000_000
    dp.maps.config.set(DatapathConfig(ct_tcp_ns=1000 * s, ct_syn_ns=100 * s, ct_closing_ns=5 * s))
    endpoint(dp)
    key = CtKey(EP, True, TCP, POD4, PEER4, 40000, 80)

    def remaining() -> float:
        entry = dp.maps.ct.get(key)
        assert entry is not None
        return (entry.expires_ns - time.monotonic_ns()) / s

    assert out(dp, frame4(POD4, PEER4, TCP, tcp(40000, 80, SYN))) == OK
    assert 99 < remaining() <= 100
    assert into(dp, frame4(PEER4, POD4, TCP, tcp(80, 40000, SYN | ACK))) == OK  # reply
    assert 99 < remaining() <= 100
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(40000, 80, ACK))) == OK
    assert 999 < remaining() <= 1000
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(40000, 80, FIN | ACK))) == OK
    assert 999 < remaining() <= 1000  # one side closing
    assert into(dp, frame4(PEER4, POD4, TCP, tcp(80, 40000, FIN | ACK))) == OK
    assert 4 < remaining() <= 5
    entry = dp.maps.ct.get(key)
    assert entry is not None
    assert entry.flags == CtFlags.SEEN_NON_SYN | CtFlags.CLOSING_FWD | CtFlags.CLOSING_REV
    assert entry.packets == 5


def test_drop_event_fields(dp: LoadedBuild, events: EventReader) -> None:
    endpoint(dp, egress=True)
    assert out(dp, frame6(POD6, PEER6, UDP, udp(5000, 53, b"q" * 10))) == SHOT
    (ev,) = events.read()
    assert ev.type == EventType.DROP and ev.reason == DropReason.POLICY_DENIED
    assert (ev.family, ev.proto, ev.direction, ev.ct_state) == (6, UDP, 2, CtState.NEW)
    assert (ev.saddr, ev.daddr, ev.sport, ev.dport) == (POD6, PEER6, 5000, 53)
    assert (ev.ep_id, ev.src_identity, ev.dst_identity) == (EP, ID, PEER_ID)
    assert ev.length == 14 + 40 + 18
    assert str(ev).startswith("xx drop (Policy denied (L3)) to endpoint 7, identity 300->400")


def test_tiers_admin_then_normal_then_baseline(dp: LoadedBuild) -> None:
    """ClusterNetworkPolicy tiers: admin precedence first, Pass defers, baseline last."""
    admin_hi = 1 << 24
    normal_allow = PolicyKey(EP, PEER_ID, True, TCP, 80)
    endpoint(dp, {normal_allow: Verdict.ALLOW}, egress=True)
    frame = frame4(POD4, PEER4, TCP, tcp(1000, 80))
    assert out(dp, frame) == OK
    # An admin Deny beats the normal allow ...
    any_port = PolicyKey.any_port(EP, 0, True)
    dp.maps.policy.set(any_port, Verdict.DENY, precedence=admin_hi - 2)
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1001, 80))) == SHOT
    # ... unless an earlier admin rule (higher precedence) accepts it.
    exact_any = PolicyKey(EP, 0, True, TCP, 80)
    dp.maps.policy.set(exact_any, Verdict.ALLOW, precedence=admin_hi - 1)
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1002, 80))) == OK
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1003, 81))) == SHOT
    # An earlier Pass hands over to the normal tier, which allows port 80 only.
    dp.maps.policy.set(PolicyKey.any_port(EP, PEER_ID, True), Verdict.PASS, precedence=admin_hi)
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1004, 80))) == OK
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1005, 81))) == SHOT  # enforced, no normal hit


def test_baseline_applies_only_when_not_enforced(dp: LoadedBuild) -> None:
    base_deny = PolicyKey(EP, PEER_ID, True, TCP, 22)
    endpoint(dp, {}, egress=False)
    dp.maps.policy.set(base_deny, Verdict.DENY, precedence=-1)
    mask = wild_mask([base_deny], True)
    dp.maps.endpoints.set(1, EndpointRow(EP, ID, False, False, 0, mask, POD4, POD6))
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1000, 22))) == SHOT
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1000, 23))) == OK
    # A normal-tier allow takes precedence over the baseline deny.
    dp.maps.policy.set(PolicyKey(EP, 0, True, TCP, 22), Verdict.ALLOW)
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1001, 22))) == OK
    # With the direction enforced, baseline no longer applies at all.
    dp.maps.policy.delete(PolicyKey(EP, 0, True, TCP, 22))
    dp.maps.endpoints.set(1, EndpointRow(EP, ID, False, True, 0, mask, POD4, POD6))
    dp.maps.policy.set(PolicyKey(EP, PEER_ID, True, TCP, 23), Verdict.ALLOW, precedence=-2)
    assert out(dp, frame4(POD4, PEER4, TCP, tcp(1002, 23))) == SHOT


# --- proxy redirect ----------------------------------------------------------------------

REENTRY_IFINDEX, REENTRY_MAC = 4242, bytes.fromhex("02aabbccddee")
TC_ACT_REDIRECT = 7
FROM_PROXY = 0x300


def _l7_ingress(dp: LoadedBuild) -> PolicyKey:
    key = PolicyKey(EP, PEER_ID, False, TCP, 80)
    endpoint(dp, {key: (Verdict.REDIRECT, 15001)}, ingress=True)
    return key


def test_ingress_redirect_without_reentry_device_only_marks(dp: LoadedBuild) -> None:
    """Proxy off (no re-entry device): marked and passed, as an egress redirect without the
    nftables rules (L7 is not enforced then: NOTES.md, Known limits)."""
    _l7_ingress(dp)
    r = dp.test_run("to_pod", frame4(PEER4, POD4, TCP, tcp(1000, 80)))
    assert r.verdict == OK and r.mark == 0x200 | 15001 << 16


def test_ingress_redirect_goes_to_the_reentry_device_with_the_mark(dp: LoadedBuild) -> None:
    dp.maps.config.set(DatapathConfig(reentry_ifindex=REENTRY_IFINDEX, reentry_mac=REENTRY_MAC))
    key = _l7_ingress(dp)
    for frame in (frame4(PEER4, POD4, TCP, tcp(1000, 80)), frame6(PEER6, POD6, TCP, tcp(1000, 80))):
        r = dp.test_run("to_pod", frame)
        assert r.verdict == TC_ACT_REDIRECT and r.mark == 0x200 | 15001 << 16
        # the ESTABLISHED packets of the flow are redirected too (never cached)
        r = dp.test_run("to_pod", frame[:-20] + tcp(1000, 80, ACK))
        assert r.verdict == TC_ACT_REDIRECT
    assert dp.maps.policy.get(key).packets == 4
    # other ports are not redirected: no policy entry, ingress enforced
    assert into(dp, frame4(PEER4, POD4, TCP, tcp(1000, 81))) == SHOT


def test_proxy_upstream_is_not_redirected_again(dp: LoadedBuild) -> None:
    """Mark 0x300 (the proxy's upstream, with its client's address): REDIRECT acts as ALLOW,
    the mark is kept, and L3/L4 still applies to the real peer."""
    dp.maps.config.set(DatapathConfig(reentry_ifindex=REENTRY_IFINDEX, reentry_mac=REENTRY_MAC))
    _l7_ingress(dp)
    r = dp.test_run("to_pod", frame4(PEER4, POD4, TCP, tcp(2000, 80)), mark=FROM_PROXY)
    assert r.verdict == OK and r.mark == FROM_PROXY
    stranger = ipaddress.IPv4Address("10.244.9.9")  # no identity: world, no rule
    assert into(dp, frame4(stranger, POD4, TCP, tcp(2001, 80)), mark=FROM_PROXY) == SHOT


def test_proxy_upstream_keeps_the_host_identity(dp: LoadedBuild) -> None:
    """A host client's address reaches the pod through the proxy without the host mark;
    with 0x300 the ipcache's host identity stands (without it, it would be world)."""
    host = ipaddress.IPv4Address("10.244.0.1")
    dp.maps.ipcache.set(f"{host}/32", 1)
    endpoint(dp, {PolicyKey.any_port(EP, 1, False): Verdict.ALLOW}, ingress=True)
    assert into(dp, frame4(host, POD4, TCP, tcp(3000, 80)), mark=FROM_PROXY) == OK
    assert into(dp, frame4(host, POD4, TCP, tcp(3001, 80))) == SHOT
