"""A pod with an Istio sidecar, attacked with what the sidecar does not see: the real agent
and BPF datapath keep L3/L4 for it outside the pod.

Istio intercepts TCP only (and IPv6 only when configured); a pod's owner can also send
around the sidecar from the app container. None of that may get past Flagella: the meshed
pod's policy (HTTP rules for the sidecar on 80/TCP, nothing else) is still enforced in the
kernel, for UDP and for IPv6, in both directions. Its HTTP port is not redirected to the
node proxy: luke's TCP connection reaches leia's port directly (the sidecar filters the
requests after mTLS), while a peer the policy does not name is dropped in BPF.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable

import pytest

from tests.system._support import (
    DENY_TIMEOUT,
    Agent,
    Cluster,
    Pod,
    assert_allowed,
    assert_denied,
    drain,
    in_netns,
    namespace,
    tcp_connect,
    udp_exchange,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
AGENT_TAG = "i"


def _policy(ns: str) -> dict:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "sys-istio-leia", "namespace": ns},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "leia"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"app": "luke"}}],
                "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                             "rules": {"http": [{"method": "GET", "path": "/public"}]}}],
            }],
            "egress": [{
                "toEndpoints": [{"matchLabels": {"app": "luke"}}],
                "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}],
            }],
        },
    }


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def icmp_echo(netns: str, dst: str, timeout: float = DENY_TIMEOUT) -> bool:
    """One ICMP (or ICMPv6) echo request from a pod; whether the reply came back."""
    v6 = ":" in dst
    with in_netns(netns):
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                          socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    request_type, reply_type = (128, 129) if v6 else (8, 0)
    body = b"flagella-istio"
    header = struct.pack("!BBHHH", request_type, 0, 0, ident, 1)
    if not v6:  # the kernel fills in ICMPv6 checksums itself
        header = struct.pack("!BBHHH", request_type, 0, _checksum(header + body), ident, 1)
    try:
        s.sendto(header + body, (dst, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                return False
            packet = s.recv(2048)
            icmp = packet if v6 else packet[(packet[0] & 0x0F) * 4:]
            kind, _, _, got_id, _ = struct.unpack("!BBHHH", icmp[:8])
            if kind == reply_type and got_id == ident:
                return True
        return False
    finally:
        s.close()


def test_meshed_pod_udp_and_ipv6_bypass_dropped_in_bpf(module_agent: Agent, make_cluster: Callable[[Agent], Cluster]) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace("is")
    leia = c.create("leia", ns, 60, {"app": "leia"}, istio_sidecar=True)
    luke = c.create("luke", ns, 61, {"app": "luke"})
    vader = c.create("vader", ns, 62, {"app": "vader"})
    plain = c.create("leia-plain", ns, 63, {"app": "leia"})  # the same pod without a sidecar
    assert leia.ep["istio_sidecar"] is True
    for family in (4, 6):
        c.servers.tcp_echo(leia.netns, leia.ip(family), 80)
        c.servers.tcp_echo(leia.netns, leia.ip(family), 9090)
        c.servers.tcp_echo(luke.netns, luke.ip(family), 8080)
        c.servers.tcp_echo(luke.netns, luke.ip(family), 9090)
    sinks = {(pod.name, fam, port): c.servers.udp_sink(pod.netns, pod.ip(fam), port)
             for pod in (leia, luke) for fam in (4, 6) for port in (53, 80)}
    c.import_policy(_policy(ns))

    def port80(pod: Pod) -> list[str]:
        rows = agent.call("bpf.policy", {"name": pod.key})
        return [r["verdict"] for r in rows if r["direction"] == "ingress" and r["identity"] == luke.ep["identity"]
                and r["protocol"] == 6 and r["ports"] == "80"]

    # What the kernel holds: the HTTP port is a plain allow for the meshed pod, a redirect otherwise.
    assert port80(leia) == ["allow"] and port80(plain) == ["redirect"]

    for family in (4, 6):
        # The HTTP port: open for luke, no node-proxy redirect in between; closed to vader.
        assert_allowed(luke, leia.ip(family), 80, f"luke -> meshed leia:80 IPv{family} (sidecar filters HTTP)")
        assert_denied(vader, leia.ip(family), 80, f"vader -> leia:80 IPv{family}, dropped in BPF")
        assert_denied(luke, leia.ip(family), 9090, f"luke -> leia:9090 IPv{family}, no rule")
        # Inbound UDP, which Istio does not intercept: dropped.
        for port in (53, 80):
            assert udp_exchange(luke.netns, leia.ip(family), port, 64, timeout=DENY_TIMEOUT) is None
        # From the meshed pod: its egress policy holds over UDP and IPv6 too.
        assert_allowed(leia, luke.ip(family), 8080, f"leia -> luke:8080 IPv{family}")
        assert_denied(leia, luke.ip(family), 9090, f"leia -> luke:9090 IPv{family}, bypass attempt")
        for port in (53, 80):
            assert udp_exchange(leia.netns, luke.ip(family), port, 64, timeout=DENY_TIMEOUT) is None
    assert all(drain(q) == [] for q in sinks.values()), "a UDP datagram got through"
    # ICMP, which Istio ignores too: echo requests into and out of the meshed pod are dropped;
    # between pods that no policy selects they pass (the probe works).
    for family in (4, 6):
        assert icmp_echo(luke.netns, vader.ip(family), timeout=3.0), f"control: luke -> vader ICMP IPv{family}"
        assert not icmp_echo(luke.netns, leia.ip(family)), f"luke -> meshed leia ICMP IPv{family}"
        assert not icmp_echo(leia.netns, luke.ip(family)), f"meshed leia -> luke ICMP IPv{family}"


def test_only_injected_pods_reach_the_control_plane(
    module_agent: Agent, make_cluster: Callable[[Agent], Cluster]
) -> None:
    """Issue 9 (5): a policy on istiod that names the agent-owned sidecar label admits
    injected pods only; a pod cannot claim the label through its own labels."""
    agent = module_agent
    c = make_cluster(agent)
    control, apps = namespace("isc"), namespace("isa")
    istiod = c.create("istiod", control, 64, {"app": "istiod"})
    meshed = c.create("meshed", apps, 65, {"app": "web"}, istio_sidecar=True)
    plain = c.create("plain", apps, 66, {"app": "web"})
    for family in (4, 6):
        c.servers.tcp_echo(istiod.netns, istiod.ip(family), 15012)
    c.import_policy({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "sys-istiod-injected-only", "namespace": control},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "istiod"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {
                    "io.cilium.k8s.policy.istiosidecarproxy": "true",
                    "io.kubernetes.pod.namespace": apps,
                }}],
                "toPorts": [{"ports": [{"port": "15012", "protocol": "TCP"}]}],
            }],
        },
    })
    for family in (4, 6):
        assert tcp_connect(meshed.netns, istiod.ip(family), 15012, timeout=3.0) == "open", f"IPv{family}"
        assert tcp_connect(plain.netns, istiod.ip(family), 15012) == "timeout", f"IPv{family}"
    with pytest.raises(Exception, match="istiosidecarproxy"):
        c.create("sneaky", apps, 67, {"app": "web", "io.cilium.k8s.policy.istiosidecarproxy": "true"})
