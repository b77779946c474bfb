"""Fixtures and helpers for the BPF datapath tests (imported explicitly by test_bpf_*.py).

Topology built per test (everything inside network namespaces this process
creates; names carry the pid so parallel or stale runs never collide):

    pod A netns                node netns (forwarding on)                pod B netns
    eth0 10.244.0.1/32  <-veth->  lxcA  fe80::1/64 ... lxcB  <-veth->  eth0 10.244.0.2/32
         fd00:10:244::1/128      routes /32 /128 per pod          fd00:10:244::2/128

The node netns plays the host: the datapath is attached to lxcA/lxcB there,
so no sysctl or route of the real host changes. The node also has
10.244.255.254/32 on lo, the "node address" for host-originated traffic.
Pods run a small JSON-lines agent (:data:`POD_AGENT`) for sockets.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.support import host

from flagella.datapath.events import DatapathEvent, EventReader
from flagella.datapath.loader import DatapathSettings, LoadedBuild, load_datapath, remove_pins
from flagella.datapath.maps import CtEntry, CtFlags, EndpointRow, PolicyKey, Verdict, wild_mask

__all__ = [
    "Node",
    "Pod",
    "PodShell",
    "build_node",
    "datapath",
    "drops",
    "events",
    "node",
    "pin_dir_for_tests",
    "requires_root",
    "run",
    "session_datapath",
    "settle",
]

_PREFIX = f"flt{os.getpid()}"


def is_tombstone(entry: CtEntry | None) -> bool:
    """A CT entry that policy denied: kept, marked DENIED, so the flow cannot be reopened."""
    return entry is not None and bool(entry.flags & CtFlags.DENIED)


#: Tests that need root, bcc and netguard (the `root_host` fixture of tests/conftest.py).
requires_root = pytest.mark.usefixtures("root_host")


def run(
    *args: str, netns: str | None = None, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return host.sh(*args, netns=netns, check=check, input=input)


def _sweep_stale() -> None:
    """Remove namespaces and pin dirs left by earlier test processes that died."""
    host.sweep_stale(r"flt(\d+)-.*", bpf_dirs=r"flagella-test-(\d+).*")


def pin_dir_for_tests(tag: str = "") -> Path:
    return Path(f"/sys/fs/bpf/flagella-test-{os.getpid()}{tag}")


# ---------------------------------------------------------------------------------------------
# Pod agent: a JSON-lines server run inside a pod netns
# ---------------------------------------------------------------------------------------------

POD_AGENT = r"""
import json, socket, struct, sys, threading, time
lock = threading.Lock()
received = {}
conns = {}
next_id = [0]

def bump(key, n):
    with lock:
        received[key] = received.get(key, 0) + n

def v6(addr):
    return ":" in addr

def tcp_listen(port):
    for fam, any_ in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((any_, port))
        s.listen(64)
        def serve(c):
            with c:
                while True:
                    try:
                        d = c.recv(65536)
                    except OSError:
                        return
                    if not d:
                        return
                    bump("tcp/%d" % port, len(d))
                    c.sendall(d)
        def loop(s=s):
            while True:
                c, _ = s.accept()
                bump("tcp-accept/%d" % port, 1)
                threading.Thread(target=serve, args=(c,), daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()

def udp_listen(port):
    for fam, any_ in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT
        s.bind((any_, port))
        def loop(s=s):
            while True:
                d, peer = s.recvfrom(65535)
                bump("udp/%d" % port, 1)
                s.sendto(d, peer)
        threading.Thread(target=loop, daemon=True).start()

def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff

def ping(addr, timeout, ident, size):
    payload = b"p" * size
    if v6(addr):
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        pkt = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + payload
        want = 129
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        pkt = struct.pack("!BBHHH", 8, 0, checksum(hdr + payload), ident, 1) + payload
        want = 0
    s.sendto(pkt, (addr, 0))
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return {"ok": False, "error": "timeout"}
        s.settimeout(left)
        try:
            d = s.recv(65535)
        except socket.timeout:
            return {"ok": False, "error": "timeout"}
        if not v6(addr):
            d = d[(d[0] & 0xf) * 4:]
        if len(d) >= 8 and d[0] == want and struct.unpack("!H", d[4:6])[0] == ident:
            return {"ok": True, "size": len(d) - 8}

def handle(req):
    op = req["op"]
    if op == "tcp_listen":
        tcp_listen(req["port"]); return {"ok": True}
    if op == "udp_listen":
        udp_listen(req["port"]); return {"ok": True}
    if op == "tcp_connect":
        fam = socket.AF_INET6 if v6(req["addr"]) else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(req["timeout"])
        if req.get("src"):
            s.bind((req["src"], 0))
        try:
            s.connect((req["addr"], req["port"]))
        except socket.timeout:
            s.close(); return {"ok": False, "error": "timeout"}
        except OSError as e:
            s.close(); return {"ok": False, "error": e.__class__.__name__}
        next_id[0] += 1
        conns[next_id[0]] = s
        return {"ok": True, "conn": next_id[0], "sport": s.getsockname()[1]}
    if op == "tcp_send_recv":
        s = conns[req["conn"]]
        data = req["data"].encode()
        s.settimeout(req["timeout"])
        got = b""
        try:
            s.sendall(data)
            while len(got) < len(data):
                d = s.recv(65536)
                if not d:
                    return {"ok": False, "error": "closed"}
                got += d
        except socket.timeout:
            return {"ok": False, "error": "timeout"}
        except OSError as e:
            return {"ok": False, "error": e.__class__.__name__}
        return {"ok": got == data}
    if op == "tcp_close":
        conns.pop(req["conn"]).close(); return {"ok": True}
    if op == "udp_echo":
        fam = socket.AF_INET6 if v6(req["addr"]) else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, 10, 0)  # DF off: let the kernel fragment
        if req.get("src"):
            s.bind((req["src"], 0))
        s.settimeout(req["timeout"])
        s.sendto(b"u" * req["size"], (req["addr"], req["port"]))
        try:
            d, _ = s.recvfrom(65535)
        except socket.timeout:
            return {"ok": False, "error": "timeout"}
        except OSError as e:
            return {"ok": False, "error": e.__class__.__name__}
        finally:
            s.close()
        return {"ok": True, "size": len(d)}
    if op == "ping":
        return ping(req["addr"], req["timeout"], req.get("id", 4242), req.get("size", 16))
    if op == "received":
        with lock:
            return {"ok": True, "received": dict(received)}
    raise ValueError(op)

for line in sys.stdin:
    req = json.loads(line)
    try:
        resp = handle(req)
    except Exception as e:
        resp = {"ok": False, "error": "agent: %r" % (e,)}
    sys.stdout.write(json.dumps(resp) + "\n")
    sys.stdout.flush()
"""


class PodShell:
    """A pod agent process inside ``netns``; :meth:`call` sends one request."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-u", "-c", POD_AGENT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], float(kw.get("timeout", 1)) + 10)
        if not ready:
            raise TimeoutError(f"pod agent in {self.netns}: no answer to {op}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"pod agent in {self.netns} exited ({self.proc.poll()})")
        resp: dict[str, Any] = json.loads(line)
        return resp

    # Shorthands used by the tests.
    def tcp_listen(self, *ports: int) -> None:
        for p in ports:
            assert self.call("tcp_listen", port=p)["ok"]

    def udp_listen(self, *ports: int) -> None:
        for p in ports:
            assert self.call("udp_listen", port=p)["ok"]

    def tcp_echo(self, addr: str, port: int, timeout: float = 2.0) -> dict[str, Any]:
        """Connect, echo one message, close: {"ok": ...}; a dropped SYN is error "timeout"."""
        r = self.call("tcp_connect", addr=addr, port=port, timeout=timeout)
        if not r["ok"]:
            return r
        e = self.call("tcp_send_recv", conn=r["conn"], data="hello", timeout=timeout)
        self.call("tcp_close", conn=r["conn"])
        return e

    def udp_echo(
        self, addr: str, port: int, size: int = 32, timeout: float = 2.0, src: str | None = None
    ) -> dict[str, Any]:
        return self.call("udp_echo", addr=addr, port=port, size=size, timeout=timeout, src=src)

    def ping(
        self, addr: str, timeout: float = 2.0, ident: int = 4242, size: int = 16
    ) -> dict[str, Any]:
        return self.call("ping", addr=addr, timeout=timeout, id=ident, size=size)

    def received(self) -> dict[str, int]:
        counts: dict[str, int] = self.call("received")["received"]
        return counts

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


# ---------------------------------------------------------------------------------------------
# Topology
# ---------------------------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    netns: str
    host_if: str
    ifindex: int  # of host_if, in the node netns
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    ep_id: int
    identity: int
    shell: PodShell

    @property
    def v4(self) -> str:
        return str(self.ipv4)

    @property
    def v6(self) -> str:
        return str(self.ipv6)

    def endpoint(self, **kw: Any) -> EndpointRow:
        return EndpointRow(
            ep_id=self.ep_id, identity=self.identity, ipv4=self.ipv4, ipv6=self.ipv6, **kw
        )


@dataclass
class Node:
    netns: str
    dp: LoadedBuild
    pods: dict[str, Pod] = field(default_factory=dict)
    address: str = "10.244.255.254"
    _shell: PodShell | None = None

    @property
    def a(self) -> Pod:
        return self.pods["a"]

    @property
    def b(self) -> Pod:
        return self.pods["b"]

    @property
    def shell(self) -> PodShell:
        """An agent in the node netns, for host-originated traffic."""
        if self._shell is None:
            self._shell = PodShell(self.netns)
        return self._shell

    def set_endpoint(self, pod: Pod, **kw: Any) -> None:
        self.dp.maps.endpoints.set(pod.ifindex, pod.endpoint(**kw))

    def apply(
        self,
        pod: Pod,
        entries: Mapping[PolicyKey, Verdict | tuple[Verdict, int]],
        *,
        ingress: bool = False,
        egress: bool = False,
    ) -> None:
        """Give ``pod`` exactly these policy entries and enforcement, masks derived."""
        desired = {k: v if isinstance(v, tuple) else (v, 0) for k, v in entries.items()}
        self.dp.maps.policy.sync_endpoint(pod.ep_id, desired)
        self.set_endpoint(
            pod,
            enforce_ingress=ingress,
            enforce_egress=egress,
            ingress_wild_mask=wild_mask(desired, egress=False),
            egress_wild_mask=wild_mask(desired, egress=True),
        )


def _sysctl(netns: str, *settings: str) -> None:
    run("sysctl", "-q", "-w", *settings, netns=netns)


def _mac(netns: str, ifname: str) -> str:
    out = run("ip", "-j", "link", "show", ifname, netns=netns).stdout
    mac: str = json.loads(out)[0]["address"]
    return mac


def _ifindex(netns: str, ifname: str) -> int:
    out = run("ip", "-j", "link", "show", ifname, netns=netns).stdout
    idx: int = json.loads(out)[0]["ifindex"]
    return idx


_node_counter = [0]


@contextlib.contextmanager
def build_node(dp: LoadedBuild, n_pods: int = 2) -> Iterator[Node]:
    """Make the node and pod namespaces, attach the datapath; remove everything on exit."""
    _node_counter[0] += 1
    tag = f"{_PREFIX}-{_node_counter[0]}"
    node_ns = f"{tag}-node"
    made: list[str] = []
    node = Node(node_ns, dp)
    try:
        run("ip", "netns", "add", node_ns)
        made.append(node_ns)
        _sysctl(
            node_ns,
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        )
        run("ip", "link", "set", "lo", "up", netns=node_ns)
        run("ip", "addr", "add", f"{node.address}/32", "dev", "lo", netns=node_ns)
        for i, name in enumerate("abcdefgh"[:n_pods]):
            pod_ns = f"{tag}-pod{name}"
            run("ip", "netns", "add", pod_ns)
            made.append(pod_ns)
            _sysctl(pod_ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
            host_if = f"lxc{name}"
            v4 = ipaddress.IPv4Address(f"10.244.0.{i + 1}")
            v6 = ipaddress.IPv6Address(f"fd00:10:244::{i + 1}")
            run(
                "ip",
                "link",
                "add",
                host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod_ns,
                netns=node_ns,
            )
            run("ip", "link", "set", host_if, "up", netns=node_ns)
            run("ip", "link", "set", "lo", "up", netns=pod_ns)
            run("ip", "link", "set", "eth0", "up", netns=pod_ns)
            host_mac, pod_mac = _mac(node_ns, host_if), _mac(pod_ns, "eth0")
            run("ip", "addr", "add", f"{v4}/32", "dev", "eth0", netns=pod_ns)
            run("ip", "-6", "addr", "add", f"{v6}/128", "dev", "eth0", "nodad", netns=pod_ns)
            run("ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link", netns=pod_ns)
            run("ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", netns=pod_ns)
            run(
                "ip",
                "neigh",
                "add",
                "169.254.1.1",
                "lladdr",
                host_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
                netns=pod_ns,
            )
            run(
                "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0", netns=pod_ns
            )
            run(
                "ip",
                "-6",
                "neigh",
                "add",
                "fe80::1",
                "lladdr",
                host_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
                netns=pod_ns,
            )
            run("ip", "-6", "addr", "add", "fe80::1/64", "dev", host_if, "nodad", netns=node_ns)
            run("ip", "route", "add", f"{v4}/32", "dev", host_if, netns=node_ns)
            run("ip", "-6", "route", "add", f"{v6}/128", "dev", host_if, netns=node_ns)
            run(
                "ip",
                "neigh",
                "add",
                str(v4),
                "lladdr",
                pod_mac,
                "dev",
                host_if,
                "nud",
                "permanent",
                netns=node_ns,
            )
            run(
                "ip",
                "-6",
                "neigh",
                "add",
                str(v6),
                "lladdr",
                pod_mac,
                "dev",
                host_if,
                "nud",
                "permanent",
                netns=node_ns,
            )
            _sysctl(node_ns, f"net.ipv4.conf.{host_if}.rp_filter=0")
            ifindex = _ifindex(node_ns, host_if)
            pod = Pod(
                name,
                pod_ns,
                host_if,
                ifindex,
                v4,
                v6,
                ep_id=100 + i,
                identity=1000 + i,
                shell=PodShell(pod_ns),
            )
            node.pods[name] = pod
            dp.attach(ifindex, netns=node_ns)
            dp.maps.ipcache.set(f"{v4}/32", pod.identity)
            dp.maps.ipcache.set(f"{v6}/128", pod.identity)
        yield node
    finally:
        for pod in node.pods.values():
            pod.shell.close()
        if node._shell is not None:
            node._shell.close()
        for ns in reversed(made):
            run("ip", "netns", "del", ns, check=False)  # takes its veths along


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def session_datapath() -> Iterator[LoadedBuild]:
    """One compiled datapath for the session, pinned under a test-only directory."""
    host.prepare(bcc=True)
    _sweep_stale()
    pin_dir = pin_dir_for_tests()
    try:
        dp = load_datapath(DatapathSettings(pin_dir=pin_dir))
        try:
            yield dp
        finally:
            dp.close()
    finally:
        remove_pins(pin_dir)


@pytest.fixture(scope="session")
def _session_events(session_datapath: LoadedBuild) -> Iterator[EventReader]:
    reader = session_datapath.events()
    try:
        yield reader
    finally:
        reader.close()


@pytest.fixture
def datapath(session_datapath: LoadedBuild, _session_events: EventReader) -> Iterator[LoadedBuild]:
    """The session datapath with empty maps and a drained event ring."""
    session_datapath.maps.clear()
    _session_events.read()
    yield session_datapath
    session_datapath.maps.clear()


@pytest.fixture
def events(datapath: LoadedBuild, _session_events: EventReader) -> EventReader:
    return _session_events


@pytest.fixture
def node(datapath: LoadedBuild) -> Iterator[Node]:
    with build_node(datapath) as n:
        yield n


def drops(evs: list[DatapathEvent], reason: int | None = None) -> list[DatapathEvent]:
    return [e for e in evs if e.type == 1 and (reason is None or e.reason == reason)]


def settle(seconds: float = 0.05) -> None:
    time.sleep(seconds)
