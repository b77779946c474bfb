"""Policy as the kernel enforces it, checked with real traffic between pods of one agent.

* CT on deny (IPv4 and IPv6): an established connection that a new policy no longer
  allows loses its next packet, its conntrack entry becomes a tombstone (flag DENIED), and the
  monitor reports the drop.
  The IPv6 case is also the check that the same allow/deny holds over IPv6.
* Anti-spoofing: a pod sending from an address it was not given is dropped ("Invalid source ip").
* IPv4 fragments: a 4000-byte datagram arrives reassembled on an allowed port, not on a denied one.
* Labels on the fly: ``flagella endpoint labels`` and ``flagella namespace labels`` flip
  verdicts both ways.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.system._support import (
    DENY_TIMEOUT,
    Agent,
    Cluster,
    Monitor,
    addr4,
    addr6,
    assert_allowed,
    assert_denied,
    bpftool_dump,
    cnp_ingress,
    drain,
    namespace,
    pod_socket,
    sh,
    tcp_connect,
    tcp_open,
    udp_exchange,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

AGENT_TAG = "p"
MakeCluster = Callable[[Agent], Cluster]


def _drops(agent: Agent) -> dict[tuple[str, str], int]:
    """``flagella bpf metrics list`` drop packets by (reason, direction)."""
    rows = agent.cli_json("bpf", "metrics", "list")
    return {(r["reason"], r["direction"]): int(r["packets"]) for r in rows if r["reason"] != "Forwarded"}


# -- 4 + 8: CT cleanup on deny, IPv4 and IPv6 --------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_ct_entry_removed_and_packet_dropped_when_policy_stops_allowing(
    module_agent: Agent, make_cluster: MakeCluster, family: int
) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace(f"ct{family}")
    base = 10 if family == 4 else 20
    server = c.create("server", ns, base, {"app": "server"})
    client = c.create("client", ns, base + 1, {"app": "client"})
    intruder = c.create("intruder", ns, base + 2, {"app": "intruder"})
    dst = server.ip(family)
    c.servers.tcp_echo(server.netns, dst, 7000)
    c.import_policy(cnp_ingress("sys-ct", ns, {"app": "server"}, {"app": "client"}, [(7000, "TCP")]))

    # The policy: client allowed, anyone else dropped.
    assert_allowed(client, dst, 7000)
    assert_denied(intruder, dst, 7000)

    conn = tcp_open(client.netns, dst, 7000)
    try:
        conn.settimeout(2.0)
        conn.sendall(b"before")
        assert conn.recv(100) == b"before"
        sport = conn.getsockname()[1]
        src_ep, dst_ep = f"{client.ip(family)}:{sport}", f"{dst}:7000"

        def server_entry() -> list[dict[str, Any]]:
            return [
                r for r in agent.cli_json("bpf", "ct", "list")
                if r["endpoint"] == server.ep["id"] and r["direction"] == "ingress"
                and r["src"] == src_ep and r["dst"] == dst_ep
            ]

        assert server_entry(), f"no ingress CT entry {src_ep} -> {dst_ep} on the server before the change"

        monitor = Monitor(agent)
        try:
            # Same policy name: the import replaces it; port 7000 is no longer allowed.
            c.import_policy(cnp_ingress("sys-ct", ns, {"app": "server"}, {"app": "client"}, [(7001, "TCP")]))
            conn.settimeout(1.0)
            conn.sendall(b"after")
            with pytest.raises(TimeoutError):
                data = conn.recv(100)
                pytest.fail(f"the established connection still gets echoes after the deny: {data!r}")
            # The entry stays as a tombstone (CT_F_DENIED = 0x8), so neither side can reopen the flow.
            left = server_entry()
            assert left and all(r["flags"] & 0x8 for r in left), f"the server's CT entry is not a tombstone: {left}"

            def policy_drop() -> list[dict[str, Any]]:
                return monitor.matching(
                    lambda e: e.get("type") == "drop" and e.get("ep_id") == server.ep["id"]
                    and str(e.get("reason_name", "")).startswith("Policy denied")
                    and e.get("src") == src_ep and e.get("dst") == dst_ep
                )

            events = wait_until(policy_drop, timeout=3, what="a Policy denied drop in flagella monitor")
            assert events[0]["direction"] == "ingress" and events[0]["proto_name"] == "TCP", events[0]
        finally:
            monitor.close()
    finally:
        conn.close()
    # New connections are denied too.
    assert_denied(client, dst, 7000, "new connection after the deny")


# -- 5: anti-spoofing ------------------------------------------------------------------------------------


def test_spoofed_source_address_is_dropped(module_agent: Agent, make_cluster: MakeCluster) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace("sp")
    target = c.create("target", ns, 30, {"app": "target"})  # selected by no policy: accepts anything
    pod = c.create("spoofer", ns, 31, {"app": "spoofer"})
    fake4, fake6 = addr4(250), addr6(250)
    sh("ip", "addr", "add", f"{fake4}/32", "dev", "eth0", netns=pod.netns)
    sh("ip", "-6", "addr", "add", f"{fake6}/128", "dev", "eth0", "nodad", netns=pod.netns)
    sinks = {
        4: c.servers.udp_sink(target.netns, target.ipv4, 7100),
        6: c.servers.udp_sink(target.netns, target.ipv6, 7100),
    }
    c.servers.tcp_echo(target.netns, target.ipv4, 7101)
    c.servers.tcp_echo(target.netns, target.ipv6, 7101)
    drops_before = _drops(agent)
    prom_before = agent.metric("flagella_drop_count_total", reason="Invalid source ip", direction="EGRESS")
    monitor = Monitor(agent)
    try:
        for family, fake in ((4, fake4), (6, fake6)):
            dst = target.ip(family)
            # Its real address works...
            assert udp_exchange(pod.netns, dst, 7100, 100, timeout=2.0) == 100
            got = [src for _, src in drain(sinks[family])]
            assert got == [pod.ip(family)], got
            assert_allowed(pod, dst, 7101)
            # ...the one it added itself does not.
            assert udp_exchange(pod.netns, dst, 7100, 100, timeout=DENY_TIMEOUT, src=fake) is None
            got_tcp = tcp_connect(pod.netns, dst, 7101, DENY_TIMEOUT, src=fake)
            assert got_tcp == "timeout", f"TCP from spoofed {fake}: {got_tcp}"
            time.sleep(0.1)
            assert drain(sinks[family]) == [], f"the target received a datagram from spoofed {fake}"

        def spoof_events() -> list[dict[str, Any]]:
            return monitor.matching(
                lambda e: e.get("reason_name") == "Invalid source ip" and e.get("ep_id") == pod.ep["id"]
            )

        events = wait_until(lambda: len({e["src"].rsplit(":", 1)[0] for e in spoof_events()}) >= 2,
                            timeout=3, what="Invalid source ip drops from both spoofed addresses")
        srcs = {e["src"].rsplit(":", 1)[0] for e in spoof_events()}
        assert srcs == {fake4, fake6}, srcs
        assert all(e["direction"] == "egress" for e in spoof_events())
        assert events
    finally:
        monitor.close()
    drops_after = _drops(agent)
    key = ("Invalid source ip", "EGRESS")
    # Two probes per family: one datagram and at least one SYN.
    assert drops_after.get(key, 0) - drops_before.get(key, 0) >= 4, (drops_before, drops_after)
    prom_after = agent.metric("flagella_drop_count_total", reason="Invalid source ip", direction="EGRESS")
    assert prom_after - prom_before >= 4, (prom_before, prom_after)


# -- 6: IPv4 fragments -----------------------------------------------------------------------------------


def test_fragmented_datagram_passes_allowed_port_only(module_agent: Agent, make_cluster: MakeCluster) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace("fr")
    server = c.create("server", ns, 40, {"app": "server"})
    client = c.create("client", ns, 41, {"app": "client"})
    allowed = c.servers.udp_sink(server.netns, server.ipv4, 7200)
    denied = c.servers.udp_sink(server.netns, server.ipv4, 7201)
    c.import_policy(cnp_ingress("sys-frag", ns, {"app": "server"}, {"app": "client"}, [(7200, "UDP")]))
    drops_before = _drops(agent)

    # 4000 bytes over a 1500-byte MTU with DF off: three fragments each way.
    echoed = udp_exchange(client.netns, server.ipv4, 7200, 4000, timeout=2.0, fragment=True)
    assert drain(allowed) == [(4000, client.ipv4)], "the allowed port did not get the datagram reassembled"
    assert echoed == 4000, "the echo (fragmented too, a reply) did not come back whole"
    frag_ports = {
        (e["formatted"]["key"]["ep_id"], socket.ntohs(e["formatted"]["value"]["dport"]))
        for e in bpftool_dump(agent, "frag4")
    }
    assert (server.ep["id"], 7200) in frag_ports, f"no frag4 entry: the datapath saw no first fragment ({frag_ports})"

    assert udp_exchange(client.netns, server.ipv4, 7201, 4000, timeout=DENY_TIMEOUT, fragment=True) is None
    time.sleep(0.2)
    assert drain(denied) == [], "a fragmented datagram reached a port policy denies"
    drops_after = _drops(agent)
    gained = {k: drops_after.get(k, 0) - drops_before.get(k, 0) for k in drops_after}
    assert gained.get(("Policy denied (L3)", "INGRESS"), 0) >= 1, gained
    # The later fragments of a denied datagram find no first fragment and are dropped as well.
    # Its later fragments: without the node proxy they reach `to_pod` and find no first
    # fragment; with it (the default) the proxy's nftables table makes the node reassemble,
    # and the kernel stops refragmenting at the first fragment `to_pod` drops. Either way
    # nothing reached the port (asserted above).
    # Small datagrams agree with the fragmented ones.
    assert udp_exchange(client.netns, server.ipv4, 7200, 100, timeout=2.0) == 100
    assert udp_exchange(client.netns, server.ipv4, 7201, 100, timeout=DENY_TIMEOUT) is None


# -- 7: labels on the fly ----------------------------------------------------------------------------------


def test_endpoint_labels_flip_the_verdict(module_agent: Agent, make_cluster: MakeCluster) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace("lb")
    server = c.create("deathstar", ns, 50, {"org": "empire", "class": "deathstar"})
    ship = c.create("ship", ns, 51, {"org": "empire", "class": "tiefighter"})
    c.servers.tcp_echo(server.netns, server.ipv4, 7300)
    c.import_policy(cnp_ingress("sys-labels", ns, {"org": "empire", "class": "deathstar"}, {"org": "empire"}, [(7300, "TCP")]))

    assert_allowed(ship, server.ipv4, 7300, "org=empire")
    identities = [ship.ep["identity"]]
    for org, check in (("alliance", assert_denied), ("empire", assert_allowed)):
        out = agent.cli_json("endpoint", "labels", ship.key, "--set", f"org={org}")
        assert out["labels"]["org"] == org, out
        identities.append(out["identity"])
        check(ship, server.ipv4, 7300, f"after endpoint labels --set org={org}")
    assert identities[1] != identities[0], f"relabelled to org=alliance but kept identity {identities}"
    assert identities[2] == identities[0], f"back to the same labels but a new identity {identities}"


def test_namespace_labels_flip_a_namespace_selector_verdict(module_agent: Agent, make_cluster: MakeCluster) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns, peer_ns = namespace("nsa"), namespace("nsb")
    server = c.create("server", ns, 60, {"app": "server"})
    client = c.create("client", peer_ns, 61, {"app": "client"}, namespace_labels={"team": "blue"})
    c.servers.tcp_echo(server.netns, server.ipv4, 7301)
    c.import_policy(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "sys-from-blue", "namespace": ns},
            "spec": {
                "podSelector": {"matchLabels": {"app": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}],
                        "ports": [{"protocol": "TCP", "port": 7301}],
                    }
                ],
            },
        }
    )
    assert_allowed(client, server.ipv4, 7301, "namespace team=blue")
    for team, check in (("red", assert_denied), ("blue", assert_allowed)):
        out = agent.cli("namespace", "labels", peer_ns, "--set", f"team={team}").stdout.strip()
        assert out == f"team={team}", out
        check(client, server.ipv4, 7301, f"after namespace labels --set team={team}")
    # Unsetting the key also takes the namespace out of the selector.
    agent.cli("namespace", "labels", peer_ns, "--unset", "team")
    assert_denied(client, server.ipv4, 7301, "after namespace labels --unset team")


# -- endpoint delete and conntrack ---------------------------------------------------------------------


def test_recreated_pod_does_not_inherit_conntrack_of_its_predecessor(
    module_agent: Agent, make_cluster: MakeCluster
) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace("rc")
    server = c.create("server", ns, 90, {"app": "server"})
    client = c.create("client", ns, 91, {"app": "client"})
    # The server accepts the client on 7700/UDP; the client accepts nothing from the server.
    c.import_policy(
        cnp_ingress("sys-to-server", ns, {"app": "server"}, {"app": "client"}, [(7700, "UDP")]),
        cnp_ingress("sys-to-client", ns, {"app": "client"}, {"app": "nobody"}, [(9, "UDP")]),
    )
    srv_sock = pod_socket(server.netns, socket.AF_INET, socket.SOCK_DGRAM)
    cli_sock = pod_socket(client.netns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        srv_sock.bind((server.ipv4, 7700))
        srv_sock.settimeout(2.0)
        cli_sock.bind((client.ipv4, 40000))
        cli_sock.settimeout(2.0)
        cli_sock.sendto(b"request", (server.ipv4, 7700))
        _, peer = srv_sock.recvfrom(100)
        srv_sock.sendto(b"reply", peer)
        assert cli_sock.recv(100) == b"reply"
    finally:
        cli_sock.close()
    old_id = client.ep["id"]
    c.delete(client)
    again = c.create("client", ns, 91, {"app": "client"})
    rx = pod_socket(again.netns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind((again.ipv4, 40000))
        rx.settimeout(DENY_TIMEOUT)
        srv_sock.sendto(b"unsolicited", (again.ipv4, 40000))
        try:
            leaked = rx.recv(100)
        except TimeoutError:
            leaked = None
    finally:
        rx.close()
        srv_sock.close()
    stale = [r for r in agent.call("bpf.ct") if r["endpoint"] == old_id and client.ipv4 in r["src"]]
    assert leaked is None, (
        f"the re-created pod (endpoint {again.ep['id']}, was {old_id}) received a datagram its policy "
        f"denies, as a reply to its predecessor's flow; CT entries left by the delete: {stale}"
    )
    assert not stale, f"CT entries of deleted endpoint {old_id}: {stale}"
