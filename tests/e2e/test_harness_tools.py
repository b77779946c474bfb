"""Self-test of the e2e runner's tools (podserver, prober, world) without the agent.

Two namespaces of our own joined by a veth (10.244.254.1/.2, fd00:10:244:ffff::1/::2),
no datapath: checks that the prober reports ``open`` for a served port,
``refused`` for an unserved one and ``timeout`` for a packet that vanishes (sent to
an address nobody holds, through a permanent neighbour entry), over TCP, UDP and
ICMP, IPv4 and IPv6; and that the world namespace answers from its TEST-NET
addresses and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import e2e_harness as h
from tests.support import host as hostenv

pytestmark = [
    pytest.mark.root,
    pytest.mark.usefixtures("root_host"),
]

A4, B4, GONE4 = "10.244.254.1", "10.244.254.2", "10.244.254.3"
A6, B6, GONE6 = "fd00:10:244:ffff::1", "fd00:10:244:ffff::2", "fd00:10:244:ffff::3"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[h.Prober, h.PodServer, Path]]:
    hostenv.netguard_on()
    logs = tmp_path_factory.mktemp("e2e-tools")
    a, b = f"e2eworld{os.getpid()}ta", f"e2eworld{os.getpid()}tb"
    helpers: list[h.JsonLines] = []
    try:
        h.sh("ip", "netns", "add", a)
        h.sh("ip", "netns", "add", b)
        h.sh("ip", "link", "add", "eth0", "netns", a, "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, v4, v6 in ((a, A4, A6), (b, B4, B6)):
            h.sh("sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.eth0.accept_dad=0", netns=ns)
            h.sh("ip", "link", "set", "lo", "up", netns=ns)
            h.sh("ip", "link", "set", "eth0", "up", netns=ns)
            h.sh("ip", "addr", "add", f"{v4}/24", "dev", "eth0", netns=ns)
            h.sh("ip", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad", netns=ns)
        h.sh("ip", "neigh", "replace", GONE4, "lladdr", "02:00:00:00:00:99", "dev", "eth0", "nud", "permanent", netns=a)
        h.sh("ip", "neigh", "replace", GONE6, "lladdr", "02:00:00:00:00:99", "dev", "eth0", "nud", "permanent", netns=a)
        server = h.PodServer(b, {(80, "TCP"), (81, "UDP")}, logs)
        helpers.append(server)
        prober = h.Prober(a, logs)
        helpers.append(prober)
        yield prober, server, logs
    finally:
        for x in helpers:
            with contextlib.suppress(Exception):
                x.close()
        h.sh("ip", "netns", "del", a, check=False)
        h.sh("ip", "netns", "del", b, check=False)


def probe(prober: h.Prober, **req) -> dict:
    return prober.submit(req).result(timeout=20)


@pytest.mark.parametrize("dst,gone", [(B4, GONE4), (B6, GONE6)], ids=["ipv4", "ipv6"])
def test_tcp(pair, dst, gone):
    prober, _, _ = pair
    assert probe(prober, kind="tcp", addr=dst, port=80, timeout=1.0)["result"] == "open"
    assert probe(prober, kind="tcp", addr=dst, port=82, timeout=1.0)["result"] == "refused"
    r = probe(prober, kind="tcp", addr=gone, port=80, timeout=0.5)
    assert r["result"] == "timeout" and r["ms"] >= 450


@pytest.mark.parametrize("dst,gone", [(B4, GONE4), (B6, GONE6)], ids=["ipv4", "ipv6"])
def test_udp(pair, dst, gone):
    prober, _, _ = pair
    assert probe(prober, kind="udp", addr=dst, port=81, timeout=0.5)["result"] == "open"
    assert probe(prober, kind="udp", addr=dst, port=83, timeout=0.5)["result"] == "refused"
    r = probe(prober, kind="udp", addr=gone, port=81, timeout=0.3, retries=1)
    assert r["result"] == "timeout" and r["ms"] >= 550


@pytest.mark.parametrize("dst,gone,t", [(B4, GONE4, 8), (B6, GONE6, 128)], ids=["ipv4", "ipv6"])
def test_icmp(pair, dst, gone, t):
    prober, _, _ = pair
    assert probe(prober, kind="icmp", addr=dst, icmp_type=t, timeout=1.0)["result"] == "open"
    assert probe(prober, kind="icmp", addr=gone, icmp_type=t, timeout=0.5)["result"] == "timeout"


def test_http_and_dynamic_ports(pair):
    prober, server, _ = pair
    r = probe(prober, kind="tcp", addr=B4, port=80, timeout=1.0, http={"method": "POST", "path": "/v1/request-landing"})
    assert r["result"] == "open" and r["http_status"] == 200
    assert probe(prober, kind="tcp", addr=B4, port=8080, timeout=1.0)["result"] == "refused"
    server.listen({(8080, "TCP"), (53, "UDP")})
    assert probe(prober, kind="tcp", addr=B4, port=8080, timeout=1.0)["result"] == "open"
    assert probe(prober, kind="udp", addr=B6, port=53, timeout=0.5)["result"] == "open"


def test_many_probes_in_parallel(pair):
    prober, _, _ = pair
    futs = [prober.submit({"kind": "tcp", "addr": GONE4, "port": 80, "timeout": 1.0}) for _ in range(100)]
    futs += [prober.submit({"kind": "udp", "addr": B4, "port": 81, "timeout": 0.5}) for _ in range(100)]
    results = [f.result(timeout=30) for f in futs]
    assert [r["result"] for r in results[:100]] == ["timeout"] * 100
    assert [r["result"] for r in results[100:]] == ["open"] * 100
    assert max(r["ms"] for r in results) < 5000  # concurrent, not 100 x 1 s


def test_world_answers_from_each_testnet_address(tmp_path: Path):
    hostenv.netguard_on()
    world = h.World("t", ["198.51.100.250", "198.51.100.251"], {(80, "TCP"), (53, "UDP")}, tmp_path)
    host = None
    try:
        world.create()
        host = h.Prober(None, tmp_path)
        for addr in world.addresses:
            assert probe(host, kind="tcp", addr=addr, port=80, timeout=1.0)["result"] == "open"
            assert probe(host, kind="udp", addr=addr, port=53, timeout=0.5)["result"] == "open"
            assert probe(host, kind="icmp", addr=addr, icmp_type=8, timeout=1.0)["result"] == "open"
    finally:
        if host is not None:
            host.close()
        world.destroy()
    assert world.netns not in h.sh("ip", "netns", "list").stdout.split()
    assert h.sh("ip", "link", "show", world.host_if, check=False).returncode != 0
    assert "198.51.100.250" not in h.sh("ip", "route", "show").stdout
