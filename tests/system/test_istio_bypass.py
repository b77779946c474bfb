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
    namespace,
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
