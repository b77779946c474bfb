"""Attacks on the kernel datapath from a pod, with real frames (issue 11, items 2, 7 and 8).

* L2: a pod with CAP_NET_RAW sends VLAN-tagged frames (802.1ad then 802.1Q, or 802.1Q twice,
  VID 0) from an AF_PACKET socket. The kernel untags them after tc ran and would deliver the
  IPv4 packet inside; the datapath drops them as "Unsupported L2 protocol", so neither a
  spoofed SYN nor UDP past a deny-all egress policy gets through. ARP keeps working.
* Fragments and ids: a 3,000-byte UDP datagram crosses over IPv6 on an allowed port and not on
  a denied one, later fragments alone are dropped; an endpoint's delete removes its frag4/frag6
  entries and its id is never handed out again.
* Established flows after a deny: a policy change that denies a live TCP stream and a UDP
  flow stops both directions, although the server keeps sending and its egress is not
  enforced (no reply-direction conntrack entry keeps the flow alive).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.system._support import (
    DENY_TIMEOUT,
    Agent,
    Cluster,
    Pod,
    assert_allowed,
    bpftool_dump,
    cnp_ingress,
    drain,
    host_ifname_for,
    in_netns,
    namespace,
    pod_socket,
    sh,
    tcp_open,
    udp_exchange,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

AGENT_TAG = "h"
MakeCluster = Callable[[Agent], Cluster]
UNSUPPORTED_L2 = "Unsupported L2 protocol"


def _drops(agent: Agent) -> dict[tuple[str, str], int]:
    rows = agent.cli_json("bpf", "metrics", "list")
    return {(r["reason"], r["direction"]): int(r["packets"]) for r in rows if r["reason"] != "Forwarded"}


# -- frames ----------------------------------------------------------------------------------------


def _mac(netns: str | None, ifname: str) -> bytes:
    argv = ["ip", "-j", "link", "show", ifname] if netns is None else ["ip", "-n", netns, "-j", "link", "show", ifname]
    info = json.loads(sh(*argv).stdout)[0]
    return bytes.fromhex(info["address"].replace(":", ""))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    pseudo = s + d + struct.pack("!BBH", 0, proto, len(l4))
    csum_at = 16 if proto == 6 else 6
    l4 = l4[:csum_at] + struct.pack("!H", _csum(pseudo + l4)) + l4[csum_at + 2:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0x1234, 0, 64, proto, 0, s, d)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + l4


def _tcp_syn(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)


def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _tagged(dst_mac: bytes, src_mac: bytes, tpids: tuple[int, ...], ethertype: int, payload: bytes) -> bytes:
    """An Ethernet frame with one VID-0 tag per TPID in ``tpids`` (outermost first)."""
    tags = b"".join(struct.pack("!HH", tpid, 0) for tpid in tpids)
    return dst_mac + src_mac + tags + struct.pack("!H", ethertype) + payload


class _Wire:
    """An AF_PACKET socket on a pod's eth0 that sends frames towards its host veth."""

    def __init__(self, agent: Agent, pod: Pod) -> None:
        self.dst = _mac(agent.node, host_ifname_for(pod.netns))
        self.src = _mac(pod.netns, "eth0")
        self.sock = pod_socket(pod.netns, socket.AF_PACKET, socket.SOCK_RAW)
        self.sock.bind(("eth0", 0))

    def send(self, tpids: tuple[int, ...], ethertype: int, payload: bytes) -> None:
        self.sock.send(_tagged(self.dst, self.src, tpids, ethertype, payload))

    def close(self) -> None:
        self.sock.close()


TAG_STACKS = [(0x88A8, 0x8100), (0x8100, 0x8100), (0x8100,)]


class _SynSniffer:
    """A raw IPPROTO_TCP socket in a pod: sees every TCP segment its IP layer delivers."""

    def __init__(self, pod: Pod) -> None:
        with in_netns(pod.netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        self.sock.settimeout(0.2)

    def syns(self, src: str, dport: int, window: float) -> int:
        seen = 0
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            try:
                pkt = self.sock.recv(65536)
            except TimeoutError:
                continue
            ihl = (pkt[0] & 0xF) * 4
            if socket.inet_ntoa(pkt[12:16]) != src:
                continue
            _, dp = struct.unpack("!HH", pkt[ihl:ihl + 4])
            if dp == dport and pkt[ihl + 13] & 0x02:
                seen += 1
        return seen

    def close(self) -> None:
        self.sock.close()


def test_vlan_tagged_spoofed_syn_does_not_reach_a_pod_that_allows_only_the_spoofed_peer(
    module_agent: Agent, make_cluster: MakeCluster
) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace("vl")
    victim = c.create("victim", ns, 70, {"app": "victim"})
    trusted = c.create("trusted", ns, 71, {"app": "trusted"})
    attacker = c.create("attacker", ns, 72, {"app": "attacker"})
    c.servers.tcp_echo(victim.netns, victim.ipv4, 7400)
    c.import_policy(cnp_ingress("sys-vlan", ns, {"app": "victim"}, {"app": "trusted"}, [(7400, "TCP")]))
    assert_allowed(trusted, victim.ipv4, 7400)
    sniffer = _SynSniffer(victim)
    wire = _Wire(agent, attacker)
    try:
        # The sniffer works: a real SYN from the trusted pod is seen.
        threading.Thread(target=lambda: assert_allowed(trusted, victim.ipv4, 7400), daemon=True).start()
        assert sniffer.syns(trusted.ipv4, 7400, 1.0) >= 1, "the sniffer in the victim saw no SYN at all"
        before = _drops(agent).get((UNSUPPORTED_L2, "EGRESS"), 0)
        syn = _ipv4(trusted.ipv4, victim.ipv4, 6, _tcp_syn(40000, 7400))
        for tpids in TAG_STACKS:
            for _ in range(3):
                wire.send(tpids, 0x0800, syn)
        got = sniffer.syns(trusted.ipv4, 7400, 1.0)
        assert got == 0, f"{got} spoofed SYNs in VLAN-tagged frames reached the victim"
        after = _drops(agent).get((UNSUPPORTED_L2, "EGRESS"), 0)
        assert after - before >= 3 * len(TAG_STACKS), (before, after)
    finally:
        wire.close()
        sniffer.close()


def test_vlan_tagged_udp_does_not_escape_deny_all_egress_and_arp_still_works(
    module_agent: Agent, make_cluster: MakeCluster
) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace("vu")
    target = c.create("target", ns, 73, {"app": "target"})  # no policy: accepts anything
    jailed = c.create("jailed", ns, 74, {"app": "jailed"})
    sink = c.servers.udp_sink(target.netns, target.ipv4, 7410)
    # ARP works before and after the policy: the neighbour is forgotten, then resolved again.
    sh("ip", "neigh", "flush", "dev", "eth0", netns=jailed.netns)
    assert udp_exchange(jailed.netns, target.ipv4, 7410, 64, timeout=2.0) == 64
    drain(sink)
    c.import_policy(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "sys-jail", "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": "jailed"}}, "policyTypes": ["Egress"]},
        }
    )
    # The jailed pod still resolves its gateway (ARP passes) although its datagram is dropped.
    sh("ip", "neigh", "flush", "dev", "eth0", netns=jailed.netns)
    assert udp_exchange(jailed.netns, target.ipv4, 7410, 64, timeout=DENY_TIMEOUT) is None
    neigh = json.loads(sh("ip", "-4", "-j", "neigh", "show", "dev", "eth0", netns=jailed.netns).stdout or "[]")
    assert any(n.get("lladdr") and "FAILED" not in n.get("state", []) for n in neigh), f"ARP did not resolve: {neigh}"
    drain(sink)
    before = _drops(agent).get((UNSUPPORTED_L2, "EGRESS"), 0)
    wire = _Wire(agent, jailed)
    try:
        dgram = _ipv4(jailed.ipv4, target.ipv4, 17, _udp(40001, 7410, b"escaped"))
        for tpids in TAG_STACKS:
            for _ in range(3):
                wire.send(tpids, 0x0800, dgram)
        # A made-up ethertype is not passed either.
        wire.send((), 0x88B5, b"\0" * 46)
        time.sleep(0.5)
        assert drain(sink) == [], "UDP in VLAN-tagged frames escaped a deny-all egress policy"
    finally:
        wire.close()
    after = _drops(agent).get((UNSUPPORTED_L2, "EGRESS"), 0)
    assert after - before >= 3 * len(TAG_STACKS) + 1, (before, after)


# -- established flows after a deny ------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def add(self, k: int) -> None:
        with self.lock:
            self.n += k

    def get(self) -> int:
        with self.lock:
            return self.n


def _pump(stop: threading.Event, send: Callable[[], Any]) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):
            send()
        time.sleep(0.02)


def _drain_into(stop: threading.Event, sock: socket.socket, counter: _Counter) -> None:
    sock.settimeout(0.1)
    while not stop.is_set():
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return
        if not data:
            return
        counter.add(len(data))


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_deny_stops_an_established_flow_in_both_directions(
    module_agent: Agent, make_cluster: MakeCluster, family: int
) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace(f"es{family}")
    base = 75 if family == 4 else 78
    server = c.create("server", ns, base, {"app": "server"})
    client = c.create("client", ns, base + 1, {"app": "client"})
    dst = server.ip(family)
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    c.import_policy(cnp_ingress("sys-est", ns, {"app": "server"}, {"app": "client"}, [(7500, "TCP"), (7501, "UDP")]))

    listener = pod_socket(server.netns, fam, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((dst, 7500))
    listener.listen(1)
    userver = pod_socket(server.netns, fam, socket.SOCK_DGRAM)
    userver.bind((dst, 7501))
    uclient = pod_socket(client.netns, fam, socket.SOCK_DGRAM)
    uclient.connect((dst, 7501))
    stop = threading.Event()
    socks = [listener, userver, uclient]
    threads: list[threading.Thread] = []
    # Bytes each side received: TCP server <- client, client <- server; UDP likewise.
    tcp_at_server, tcp_at_client, udp_at_server, udp_at_client = _Counter(), _Counter(), _Counter(), _Counter()
    try:
        conn = tcp_open(client.netns, dst, 7500)
        socks.append(conn)
        listener.settimeout(2.0)
        served, _ = listener.accept()
        socks.append(served)
        uclient.send(b"hello")  # the UDP flow starts at the client, as policy allows
        userver.settimeout(2.0)
        _, upeer = userver.recvfrom(100)
        udp_at_server.add(5)

        def udp_server_loop() -> None:
            userver.settimeout(0.05)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError, OSError):
                    data, peer = userver.recvfrom(65536)
                    udp_at_server.add(len(data))
                    userver.sendto(data, peer)  # echo
                with contextlib.suppress(OSError):
                    userver.sendto(b"push" * 64, upeer)  # and keep sending on its own

        for target, args in (
            (_pump, (stop, lambda: conn.send(b"c" * 512))),  # the client keeps sending
            (_pump, (stop, lambda: served.send(b"s" * 512))),  # the server keeps sending
            (_drain_into, (stop, served, tcp_at_server)),
            (_drain_into, (stop, conn, tcp_at_client)),
            (_pump, (stop, lambda: uclient.send(b"u" * 256))),
            (_drain_into, (stop, uclient, udp_at_client)),
            (udp_server_loop, ()),
        ):
            t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
            t.start()
            threads.append(t)
        counters = {
            "TCP client->server": tcp_at_server, "TCP server->client": tcp_at_client,
            "UDP client->server": udp_at_server, "UDP server->client": udp_at_client,
        }
        # Everything flows while policy allows it.
        start = {k: v.get() for k, v in counters.items()}
        wait_until(lambda: all(v.get() > start[k] for k, v in counters.items()), timeout=5,
                   what="traffic in all four directions before the deny")

        # Same name: the import replaces the policy; neither port is allowed any more.
        c.import_policy(cnp_ingress("sys-est", ns, {"app": "server"}, {"app": "client"}, [(7600, "TCP")]))
        time.sleep(1.5)  # bounded time for the flows to stop (and in-flight bytes to land)
        settled = {k: v.get() for k, v in counters.items()}
        time.sleep(2.0)
        moved = {k: v.get() - settled[k] for k, v in counters.items() if v.get() != settled[k]}
        assert not moved, f"bytes still flow after the deny (per direction, in 2 s): {moved}"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=2)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


# -- fragments and endpoint ids --------------------------------------------------------------------


def test_deleted_endpoint_leaves_no_fragment_entries_and_its_id_is_not_reused(
    module_agent: Agent, make_cluster: MakeCluster
) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace("fd")
    server = c.create("server", ns, 81, {"app": "server"})
    client = c.create("client", ns, 82, {"app": "client"})
    c.servers.udp_sink(server.netns, server.ipv4, 7700)
    # 4000 bytes with DF off: first fragments pass both hooks and are recorded in frag4.
    assert udp_exchange(client.netns, server.ipv4, 7700, 4000, timeout=2.0, fragment=True) == 4000

    def frag_rows() -> list[tuple[int, str, str]]:
        out = []
        for e in bpftool_dump(agent, "frag4"):
            k = e["formatted"]["key"]
            out.append((int(k["ep_id"]), socket.inet_ntoa(struct.pack("<I", int(k["saddr"]))),
                        socket.inet_ntoa(struct.pack("<I", int(k["daddr"])))))
        return out

    def of_client(rows: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
        return [r for r in rows if r[0] == client.ep["id"] or client.ipv4 in r[1:]]

    assert of_client(frag_rows()), f"no frag4 entry of the client to begin with: {frag_rows()}"
    old_id = client.ep["id"]
    c.delete(client)
    assert of_client(frag_rows()) == [], "endpoint delete left fragment entries behind"
    again = c.create("client2", ns, 83, {"app": "client"})
    assert again.ep["id"] > max(old_id, server.ep["id"]), (old_id, again.ep["id"])


def _ipv6_fragment(src: str, dst: str, ident: int, offset: int, more: bool, data: bytes) -> bytes:
    """An IPv6 packet carrying one fragment (Next Header UDP) at byte ``offset`` of its datagram."""
    frag = struct.pack("!BBHI", 17, 0, offset | int(more), ident)
    payload = frag + data
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 44, 64,
                      socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst))
    return hdr + payload


def test_ipv6_fragments_follow_the_policy_of_their_first(module_agent: Agent, make_cluster: MakeCluster) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace("f6")
    server = c.create("server", ns, 84, {"app": "server"})
    client = c.create("client", ns, 85, {"app": "client"})
    allowed = c.servers.udp_sink(server.netns, server.ipv6, 7800)
    denied = c.servers.udp_sink(server.netns, server.ipv6, 7801)
    c.import_policy(cnp_ingress("sys-frag6", ns, {"app": "server"}, {"app": "client"}, [(7800, "UDP")]))
    before = _drops(agent)

    # 3000 bytes over a 1500-byte MTU: the sender fragments, and so does the echo.
    assert udp_exchange(client.netns, server.ipv6, 7800, 3000, timeout=2.0) == 3000
    assert drain(allowed) == [(3000, client.ipv6)]
    ports = {(e["formatted"]["key"]["ep_id"], socket.ntohs(e["formatted"]["value"]["dport"]))
             for e in bpftool_dump(agent, "frag6")}
    assert (server.ep["id"], 7800) in ports, f"no frag6 entry: the datapath saw no first fragment ({ports})"

    # The policy of the first fragment holds for the datagram.
    assert udp_exchange(client.netns, server.ipv6, 7801, 3000, timeout=DENY_TIMEOUT) is None
    time.sleep(0.2)
    assert drain(denied) == [], "a fragmented IPv6 datagram reached a port policy denies"

    # Later fragments alone, sent raw from the pod: nothing to follow, dropped.
    wire = _Wire(agent, client)
    try:
        for ident in (0x5150, 0x5151):
            wire.send((), 0x86DD, _ipv6_fragment(client.ipv6, server.ipv6, ident, 1448, False, b"z" * 600))
    finally:
        wire.close()
    after = _drops(agent)
    gained = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert gained.get(("Policy denied (L3)", "INGRESS"), 0) >= 1, gained
    # The denied datagram's later fragments: without the node proxy they reach `to_pod` and
    # find no first fragment; with it (the default) the proxy's nftables table makes the node
    # reassemble, and the kernel stops refragmenting at the first fragment `to_pod` drops.
    # Either way nothing reached the port (asserted above).
    assert gained.get(("First logical datagram fragment not found", "EGRESS"), 0) >= 2, gained
    assert gained.get(("IPv6 fragmentation not supported", "EGRESS"), 0) == 0, gained

    # Deleting the client forgets the frag6 entries it had, and those naming its address.
    def of_client() -> list[dict[str, Any]]:
        rows = bpftool_dump(agent, "frag6")
        mine = socket.inet_pton(socket.AF_INET6, client.ipv6)
        return [e for e in rows if e["formatted"]["key"]["ep_id"] == client.ep["id"]
                or mine in (bytes(e["formatted"]["key"]["saddr"]), bytes(e["formatted"]["key"]["daddr"]))]

    assert of_client(), "no frag6 entry of the client to begin with"
    c.delete(client)
    assert of_client() == [], "endpoint delete left frag6 entries behind"
