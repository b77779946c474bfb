"""Pod links: the pure parts (settings, naming, IPAM) and, as root, the real kernel.

Kernel tests create their own namespaces with random names and a random /24 (and /112)
inside the pod ranges 10.244.0.0/16 and fd00:10:244::/48, send traffic only to those
namespaces, and remove everything they made in teardown, even on failure. They switch on
netguard first, so nothing a pod sends can be forwarded out of the machine.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from tests.support import host

from flagella.datapath.links import (
    GATEWAY_IPV4,
    GATEWAY_IPV6,
    ROUTE_PROTOCOL,
    LinkSettings,
    PodAddressAllocator,
    PodCIDRExhausted,
    PodLink,
    PodNetwork,
    host_ifname_for,
    prepare_host,
)
from flagella.errors import InputError

# -- pure: settings, naming, allocator -------------------------------------------------------


def test_settings_defaults_and_route_mtu() -> None:
    settings = LinkSettings()
    assert settings.ipv4_cidr == IPv4Network("10.244.0.0/24")
    assert settings.ipv6_cidr == IPv6Network("fd00:10:244::/112")
    assert settings.mtu == 1500
    assert settings.route_mtu is None
    assert LinkSettings(tunnel_mtu_overhead=50).route_mtu == 1450


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mtu": 1000}, "mtu"),  # below IPv6's 1280 on a dual-stack node
        ({"mtu": 70000}, "mtu"),
        ({"tunnel_mtu_overhead": -1}, "tunnel_mtu_overhead"),
        ({"tunnel_mtu_overhead": 300}, "tunnel_mtu_overhead"),  # 1500 - 300 < 1280
        ({"ipv4_cidr": "10.244.0.0/24"}, "ipv4_cidr"),
        ({"ipv6_cidr": IPv4Network("10.0.0.0/8")}, "ipv6_cidr"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InputError, match=field):
        LinkSettings(**kwargs)  # type: ignore[arg-type]


def test_ipv4_only_settings_allow_smaller_mtu() -> None:
    assert LinkSettings(ipv6_cidr=None, mtu=1000).mtu == 1000


def test_host_ifname_is_deterministic_short_and_distinct() -> None:
    name = host_ifname_for("cni-1234")
    assert name == host_ifname_for("cni-1234")
    assert name.startswith("fl") and len(name) == 10 and len(name) <= 15
    assert int(name[2:], 16) >= 0
    assert len({host_ifname_for(f"pod-{i}") for i in range(1000)}) == 1000


def test_allocator_skips_network_gateway_and_broadcast() -> None:
    allocator = PodAddressAllocator(IPv4Network("10.244.0.0/29"))
    got = [allocator.allocate() for _ in range(5)]
    assert got == [IPv4Address(f"10.244.0.{i}") for i in range(2, 7)]
    assert allocator.capacity == 5
    with pytest.raises(PodCIDRExhausted, match="10.244.0.0/29"):
        allocator.allocate()


def test_allocator_honours_requests_and_rejects_taken_outside_or_reserved() -> None:
    allocator = PodAddressAllocator(
        IPv4Network("10.244.0.0/24"), in_use=[IPv4Address("10.244.0.2")]
    )
    assert allocator.allocate(IPv4Address("10.244.0.77")) == IPv4Address("10.244.0.77")
    with pytest.raises(InputError, match="already in use"):
        allocator.allocate(IPv4Address("10.244.0.77"))
    with pytest.raises(InputError, match="already in use"):
        allocator.allocate(IPv4Address("10.244.0.2"))
    with pytest.raises(InputError, match="not in pod CIDR"):
        allocator.allocate(IPv4Address("10.244.1.5"))
    for reserved in ("10.244.0.0", "10.244.0.1", "10.244.0.255"):
        with pytest.raises(InputError, match="reserved"):
            allocator.allocate(IPv4Address(reserved))
    assert allocator.allocate() == IPv4Address("10.244.0.3")  # .2 was in use
    assert allocator.in_use == {IPv4Address(a) for a in ("10.244.0.2", "10.244.0.3", "10.244.0.77")}


def test_allocator_rejects_in_use_addresses_outside_the_cidr() -> None:
    with pytest.raises(InputError, match="not in pod CIDR"):
        PodAddressAllocator(IPv4Network("10.244.0.0/24"), in_use=[IPv4Address("10.9.0.2")])


def test_allocator_reuses_released_addresses_last() -> None:
    allocator = PodAddressAllocator(IPv4Network("10.244.0.0/29"))
    first = allocator.allocate()
    allocator.release(first)
    # The rest of the range comes first, then the wrap-around finds the released one.
    assert [allocator.allocate() for _ in range(5)][-1] == first
    allocator.release(IPv4Address("10.244.0.4"))
    assert allocator.allocate() == IPv4Address("10.244.0.4")


def test_allocator_ipv6() -> None:
    allocator = PodAddressAllocator(IPv6Network("fd00:10:244::/112"))
    assert allocator.capacity == 2**16 - 3
    assert allocator.allocate() == IPv6Address("fd00:10:244::2")
    assert allocator.allocate(IPv6Address("fd00:10:244::beef")) == IPv6Address("fd00:10:244::beef")
    with pytest.raises(InputError, match="not in pod CIDR"):
        allocator.allocate(IPv4Address("10.244.0.9"))  # type: ignore[arg-type]


def test_ensure_pod_rejects_bad_names_and_foreign_addresses_before_touching_the_kernel() -> None:
    net = PodNetwork(LinkSettings())
    with pytest.raises(InputError, match="netns name"):
        net.ensure_pod("../etc", IPv4Address("10.244.0.5"))
    with pytest.raises(InputError, match="not in 10.244.0.0/24"):
        net.ensure_pod("pod-a", IPv4Address("192.0.2.10"))
    with pytest.raises(InputError, match="ipv6"):
        net.ensure_pod("pod-a", IPv4Address("10.244.0.5"), IPv6Address("2001:db8::5"))
    with pytest.raises(InputError, match="ipv6"):
        PodNetwork(LinkSettings(ipv6_cidr=None)).ensure_pod(
            "pod-a", IPv4Address("10.244.0.5"), IPv6Address("fd00:10:244::5")
        )


# -- real kernel -----------------------------------------------------------------------------


# Run as `python -c PROBE <command> ...` inside a pod (via `ip netns exec`) or on the host.
PROBE = r"""
import os, socket, struct, sys, time

def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF

def ping(dst):
    v6 = ":" in dst
    family = socket.AF_INET6 if v6 else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    request, reply = (128, 129) if v6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    payload = b"flagella-ping"
    header = struct.pack("!BBHHH", request, 0, 0, ident, 1)
    if not v6:  # the kernel fills in ICMPv6 checksums, not ICMP ones
        header = struct.pack("!BBHHH", request, 0, checksum(header + payload), ident, 1)
    with socket.socket(family, socket.SOCK_RAW, proto) as s:
        s.settimeout(2)
        s.sendto(header + payload, (dst, 0))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            data = s.recv(2048)
            if not v6:
                data = data[(data[0] & 0x0F) * 4:]
            kind, _, _, got_ident, _ = struct.unpack("!BBHHH", data[:8])
            if kind == reply and got_ident == ident and data[8:] == payload:
                return 0
    return 1

def serve(port):
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", int(port)))
        s.listen()
        print("ready", flush=True)
        while True:
            conn, _ = s.accept()
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

def connect(dst, port):
    with socket.create_connection((dst, int(port)), timeout=3) as s:
        s.sendall(b"hello " + dst.encode())
        return 0 if s.recv(4096) == b"hello " + dst.encode() else 1

command, *args = sys.argv[1:]
sys.exit({"ping": ping, "serve": serve, "connect": connect}[command](*args))
"""

PORT = 7777


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


def _ip(*argv: str) -> str:
    result = _run("ip", *argv)
    assert result.returncode == 0, f"ip {' '.join(argv)}: {result.stderr}"
    return result.stdout


def _ip_json(*argv: str) -> list[dict[str, object]]:
    return json.loads(_ip("-j", *argv) or "[]")  # type: ignore[no-any-return]


def _probe(netns: str | None, *argv: str) -> int:
    prefix = ("ip", "netns", "exec", netns) if netns else ()
    return _run(*prefix, sys.executable, "-c", PROBE, *argv).returncode


class Pods:
    """Test helper: a PodNetwork over a random slice of the pod ranges, cleaned up after."""

    def __init__(self, settings: LinkSettings) -> None:
        self.settings = settings
        self.net = PodNetwork(settings)
        self.token = secrets.token_hex(3)
        self.names: list[str] = []
        self.servers: list[subprocess.Popen[str]] = []

    def name(self, suffix: str) -> str:
        name = f"fltest-{self.token}-{suffix}"
        self.names.append(name)
        return name

    def ipv4(self, host: int) -> IPv4Address:
        return self.settings.ipv4_cidr[host]

    def ipv6(self, host: int) -> IPv6Address:
        assert self.settings.ipv6_cidr is not None
        return self.settings.ipv6_cidr[host]

    def add(self, suffix: str, host: int, ipv6: bool = True) -> PodLink:
        return self.net.ensure_pod(
            self.name(suffix), self.ipv4(host), self.ipv6(host) if ipv6 else None
        )

    def serve(self, netns: str) -> None:
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", PROBE, "serve", str(PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.servers.append(server)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"

    def cleanup(self) -> None:
        for server in self.servers:
            server.kill()
            server.wait()
        failures = []
        for name in self.names:
            try:
                self.net.remove_pod(name)
            except Exception as exc:  # the library failed: clean up by hand, then fail
                failures.append(exc)
                _run("ip", "link", "del", host_ifname_for(name))
                _run("ip", "netns", "del", name)
        if failures:
            raise failures[0]


@pytest.fixture(scope="module")
def netguard() -> None:
    host.prepare()


def _random_settings() -> LinkSettings:
    third = 128 + secrets.randbelow(120)  # a /24 in 10.244.128.0-10.244.247.0
    return LinkSettings(
        ipv4_cidr=IPv4Network(f"10.244.{third}.0/24"),
        ipv6_cidr=IPv6Network(f"fd00:10:244:{third:x}::/112"),
    )


@pytest.fixture
def pods(netguard: None) -> Iterator[Pods]:
    settings = _random_settings()
    helper = Pods(settings)
    try:
        prepare_host(settings)
        yield helper
    finally:
        try:
            helper.cleanup()
        finally:
            _run("ip", "route", "del", "unreachable", str(settings.ipv4_cidr))
            _run("ip", "-6", "route", "del", "unreachable", str(settings.ipv6_cidr))


@pytest.mark.root
def test_pods_reach_each_other_and_the_host_reaches_them(pods: Pods) -> None:
    a = pods.add("a", 10)
    b = pods.add("b", 11)
    for dst in (b.ipv4, b.ipv6):
        assert _probe(a.netns, "ping", str(dst)) == 0, f"{a.netns} cannot ping {dst}"
    for pod in (a, b):
        for dst in (pod.ipv4, pod.ipv6):
            assert _probe(None, "ping", str(dst)) == 0, f"host cannot ping {dst}"
    pods.serve(b.netns)
    for dst in (b.ipv4, b.ipv6):
        assert _probe(a.netns, "connect", str(dst), str(PORT)) == 0, f"TCP {a.netns} -> {dst}"


@pytest.mark.root
def test_pod_plumbing_matches_the_design(pods: Pods) -> None:
    pod = pods.add("a", 20)
    assert pod.ipv6 is not None
    host_link = _ip_json("link", "show", "dev", pod.host_ifname)[0]
    assert host_link["ifindex"] == pod.host_ifindex
    assert host_link["address"] == pod.host_mac
    assert host_link["mtu"] == 1500
    assert host_link["ifalias"] == pod.netns
    pod_links = {link["ifname"]: link for link in _ip_json("-n", pod.netns, "link")}
    assert pod_links["eth0"]["address"] == pod.pod_mac
    assert pod_links["eth0"]["mtu"] == 1500
    assert "UP" in pod_links["lo"]["flags"]  # type: ignore[operator]

    addresses = {
        (a["local"], a["prefixlen"])
        for entry in _ip_json("-n", pod.netns, "addr", "show", "dev", "eth0")
        for a in entry["addr_info"]  # type: ignore[attr-defined]
        if a["scope"] == "global"
    }
    assert addresses == {(str(pod.ipv4), 32), (str(pod.ipv6), 128)}
    accept_dad = "/proc/sys/net/ipv6/conf/eth0/accept_dad"
    assert _ip("netns", "exec", pod.netns, "cat", accept_dad) == "0\n"

    route4 = _ip("-n", pod.netns, "route", "show", "default")
    assert f"via {GATEWAY_IPV4} dev eth0" in route4 and "onlink" in route4
    assert "mtu" not in route4
    assert f"via {GATEWAY_IPV6} dev eth0" in _ip("-n", pod.netns, "-6", "route", "show", "default")
    pod_neigh = _ip("-n", pod.netns, "neigh", "show", "dev", "eth0", "nud", "permanent")
    assert f"{GATEWAY_IPV4} lladdr {pod.host_mac} PERMANENT" in pod_neigh
    assert f"{GATEWAY_IPV6} lladdr {pod.host_mac} PERMANENT" in pod_neigh

    host_neigh = _ip("neigh", "show", "dev", pod.host_ifname, "nud", "permanent")
    assert f"{pod.ipv4} lladdr {pod.pod_mac} PERMANENT" in host_neigh
    assert f"{pod.ipv6} lladdr {pod.pod_mac} PERMANENT" in host_neigh
    assert _ip("route", "show", f"{pod.ipv4}/32").split() == [
        str(pod.ipv4),
        "dev",
        pod.host_ifname,
        "proto",
        str(ROUTE_PROTOCOL),
        "scope",
        "link",
    ]
    assert f"dev {pod.host_ifname} proto {ROUTE_PROTOCOL}" in _ip(
        "-6", "route", "show", f"{pod.ipv6}/128"
    )
    assert f"inet6 {GATEWAY_IPV6}/64 scope link nodad" in _ip("addr", "show", pod.host_ifname)
    sysctls = {
        f"/proc/sys/net/ipv4/conf/{pod.host_ifname}/rp_filter": "0",
        f"/proc/sys/net/ipv4/conf/{pod.host_ifname}/forwarding": "1",
        f"/proc/sys/net/ipv6/conf/{pod.host_ifname}/accept_ra": "0",
        f"/proc/sys/net/ipv6/conf/{pod.host_ifname}/forwarding": "1",
        "/proc/sys/net/ipv4/ip_forward": "1",
        "/proc/sys/net/ipv6/conf/all/forwarding": "1",
    }
    assert {k: Path(k).read_text().strip() for k in sysctls} == sysctls
    # prepare_host: addresses of the node CIDR without a pod are refused, not routed out.
    assert _ip("route", "show", str(pods.settings.ipv4_cidr)).startswith("unreachable")
    assert _ip("-6", "route", "show", str(pods.settings.ipv6_cidr)).startswith("unreachable")
    assert _run("ip", "route", "get", str(pods.ipv4(200))).returncode != 0  # no route
    assert set(PodNetwork.host_addresses()) >= {
        IPv4Address("127.0.0.1"),
        IPv6Address("::1"),
        GATEWAY_IPV6,
    }


@pytest.mark.root
def test_ensure_pod_is_idempotent_and_repairs_in_place(pods: Pods) -> None:
    pod = pods.add("a", 30)
    assert pod.ipv6 is not None
    pods.serve(pod.netns)
    with socket.create_connection((str(pod.ipv4), PORT), timeout=3) as conn:

        def echo(message: bytes) -> bytes:
            conn.sendall(message)
            return conn.recv(4096)

        assert echo(b"before") == b"before"
        with capture_logs() as logs:
            again = pods.net.ensure_pod(pod.netns, pod.ipv4, pod.ipv6)
        assert again == pod  # same ifindex, same MACs
        assert logs == []  # a healthy pod is left alone: nothing written, nothing logged
        assert echo(b"after a no-op ensure") == b"after a no-op ensure"

        # Break it by hand, several ways at once.
        _ip("route", "del", f"{pod.ipv4}/32")
        _ip("-6", "route", "del", f"{pod.ipv6}/128")
        _ip("link", "set", "dev", pod.host_ifname, "mtu", "1400")
        _ip("-n", pod.netns, "link", "set", "dev", "eth0", "mtu", "1300")
        _ip("-n", pod.netns, "route", "del", "default")
        _ip("-n", pod.netns, "addr", "del", f"{pod.ipv6}/128", "dev", "eth0")
        _ip("neigh", "del", str(pod.ipv4), "dev", pod.host_ifname)
        _ip("-n", pod.netns, "addr", "add", "10.244.254.254/32", "dev", "eth0")

        with capture_logs() as logs:
            repaired = pods.net.ensure_pod(pod.netns, pod.ipv4, pod.ipv6)
        assert repaired == pod  # repaired in place: the ifindex is unchanged
        assert [e["event"] for e in logs] == ["pod_link_repaired"]
        assert len(logs[0]["repairs"]) == 8, logs[0]["repairs"]
        assert _ip("route", "show", f"{pod.ipv4}/32").strip()
        assert _ip("-6", "route", "show", f"{pod.ipv6}/128").strip()
        assert _ip_json("link", "show", "dev", pod.host_ifname)[0]["mtu"] == 1500
        assert "10.244.254.254" not in _ip("-n", pod.netns, "addr")
        assert echo(b"after a repair") == b"after a repair"
    assert _probe(None, "ping", str(pod.ipv6)) == 0


@pytest.mark.root
def test_ensure_pod_changes_addresses_in_place(pods: Pods) -> None:
    pod = pods.add("a", 40)
    moved = pods.net.ensure_pod(pod.netns, pods.ipv4(41), None)
    assert moved.host_ifindex == pod.host_ifindex
    assert moved.ipv4 == pods.ipv4(41) and moved.ipv6 is None
    assert _ip("route", "show", f"{pod.ipv4}/32").strip() == ""
    assert _ip("-6", "route", "show", f"{pod.ipv6}/128").strip() == ""
    assert str(pod.ipv4) not in _ip("neigh", "show", "dev", pod.host_ifname)
    assert _ip("-n", pod.netns, "-6", "route", "show", "default").strip() == ""
    assert _probe(None, "ping", str(moved.ipv4)) == 0


@pytest.mark.root
def test_ensure_pod_recreates_a_pod_whose_netns_was_deleted(pods: Pods) -> None:
    pod = pods.add("a", 45)
    _ip("netns", "del", pod.netns)  # the veth dies with the namespace, asynchronously
    again = pods.net.ensure_pod(pod.netns, pod.ipv4, pod.ipv6)
    assert again.netns == pod.netns and again.host_ifname == pod.host_ifname
    assert again.pod_mac != pod.pod_mac  # a new veth
    assert _probe(None, "ping", str(pod.ipv4)) == 0
    assert _probe(None, "ping", str(pod.ipv6)) == 0


@pytest.mark.root
def test_tunnel_overhead_lowers_the_route_mtu_not_the_device_mtu(pods: Pods) -> None:
    vxlan = PodNetwork(
        LinkSettings(
            ipv4_cidr=pods.settings.ipv4_cidr,
            ipv6_cidr=pods.settings.ipv6_cidr,
            tunnel_mtu_overhead=50,
        )
    )
    name = pods.name("a")
    pod = vxlan.ensure_pod(name, pods.ipv4(50), pods.ipv6(50))
    assert "mtu 1450" in _ip("-n", name, "route", "show", "default")
    assert "mtu 1450" in _ip("-n", name, "-6", "route", "show", "default")
    assert _ip_json("-n", name, "link", "show", "dev", "eth0")[0]["mtu"] == 1500
    assert _ip_json("link", "show", "dev", pod.host_ifname)[0]["mtu"] == 1500
    assert _probe(None, "ping", str(pod.ipv4)) == 0

    # Switching to native routing drops the route MTU in place.
    assert pods.net.ensure_pod(name, pod.ipv4, pod.ipv6) == pod
    assert "mtu" not in _ip("-n", name, "route", "show", "default")
    assert "mtu" not in _ip("-n", name, "-6", "route", "show", "default")


@pytest.mark.root
def test_list_pods_after_an_agent_restart(pods: Pods) -> None:
    made = [pods.add("a", 60), pods.add("b", 61, ipv6=False)]
    restarted = PodNetwork(pods.settings)
    found = [p for p in restarted.list_pods() if p.netns in pods.names]
    assert found == made


@pytest.mark.root
def test_list_pods_skips_and_logs_incomplete_pods(pods: Pods) -> None:
    pod = pods.add("a", 65)
    _ip("-n", pod.netns, "addr", "del", f"{pod.ipv4}/32", "dev", "eth0")
    with capture_logs() as logs:
        listed = [p.netns for p in pods.net.list_pods()]
    assert pod.netns not in listed
    assert {
        "event": "pod_link_incomplete",
        "netns": pod.netns,
        "reason": "no IPv4 address",
        "log_level": "warning",
    } in logs


@pytest.mark.root
def test_remove_pod_leaves_nothing_behind(pods: Pods) -> None:
    pod = pods.add("a", 70)
    assert pods.net.remove_pod(pod.netns) is True
    assert pod.netns not in _ip("netns", "list")
    assert not Path("/var/run/netns", pod.netns).exists()
    assert _run("ip", "link", "show", "dev", pod.host_ifname).returncode != 0
    assert _ip("route", "show", f"{pod.ipv4}/32").strip() == ""
    assert _ip("-6", "route", "show", f"{pod.ipv6}/128").strip() == ""
    assert str(pod.ipv4) not in _ip("neigh", "show")
    assert str(pod.ipv6) not in _ip("-6", "neigh", "show")
    assert pod.netns not in [p.netns for p in pods.net.list_pods()]
    assert pods.net.remove_pod(pod.netns) is False  # already gone: a no-op
