"""L7 policy enforced on real requests: the kernel datapath hands flows to a real Envoy.

One agent with the proxy on (test-unique re-entry device and nftables table, in the
agent's own node namespace), three pods (server, client, other) and a world namespace on
TEST-NET-2 joined to the node. The agent runs the real Envoy itself and configures it over
xDS (listeners, ECDS RBAC, access log); `policy import --wait` returns once Envoy ACKed and
the kernel redirects. Real curl and a real gRPC client (cleartext HTTP/2) send the
requests.

* Ingress rules of the server: the client pod, the host and world are held to them; an
  allowed request reaches the server with the client's real address as peer; a denied
  one gets 403 ``Access denied\\r\\n`` from Envoy (IPv4 and IPv6, world on TEST-NET-2 and
  2001:db8:100::/64); a pod that L3/L4 denies gets no answer.
* Egress rules of the client: the same, on the client's side (a port the server accepts
  from the client without L7 rules).
* Both sides on one port: the egress proxy's upstream is not redirected again, and the
  server's ingress rules are applied in the egress chain; a request that the client's
  rules allow and the server's deny gets 403.
* IPv4 and IPv6; TCP keepalive on the proxy's sockets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from flagella.proxy.envoy import EnvoyProcess, bootstrap, free_port
from flagella.proxy.ports import ProxySettings
from tests.system._support import PID, Agent, Cluster, Pod, in_netns, sh

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

NS = "l7r"
HOST4 = "198.51.100.1"  # the node's address towards world: the host's source address
WORLD4 = "198.51.100.10"
HOST6 = "2001:db8:100::1"  # documentation prefix, on the node's link to world only
WORLD6 = "2001:db8:100::10"
PORTS = ProxySettings(enabled=True, ingress_port=15101, egress_port=15102,
                      reentry_ifname=f"flrd{PID % 100000}a", reentry_peer=f"flrd{PID % 100000}b",
                      nft_table=f"flagella_proxy_{PID}")
IDS = {"server": 1000, "client": 1001, "other": 1002}
HOST_ID = 1


def _policy() -> list[dict[str, Any]]:
    http = lambda *paths: {"http": [{"method": "GET", "path": p} for p in paths]}  # noqa: E731
    port = lambda p, rules=None: {"ports": [{"port": str(p), "protocol": "TCP"}], **({"rules": rules} if rules else {})}  # noqa: E731
    server = {"matchLabels": {"app": "server"}}
    client = {"matchLabels": {"app": "client"}}
    return [
        {
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "l7-server", "namespace": NS},
            "spec": {
                "endpointSelector": server,
                "ingress": [
                    {"fromEndpoints": [client], "toPorts": [port(80, http("/public")), port(81), port(82, http("/both/ok"))]},
                    {"fromEndpoints": [client], "toPorts": [port(8080, {"http": [{"path": "/flagella.Test/Allowed"}]})]},
                    {"fromEntities": ["world", "host"], "toPorts": [port(80, http("/public"))]},
                ],
            },
        },
        {
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "l7-client", "namespace": NS},
            "spec": {
                "endpointSelector": client,
                "egress": [
                    {"toEndpoints": [server], "toPorts": [port(80), port(8080), port(81, http("/egress-ok")), port(82, http("/both/.*"))]},
                ],
            },
        },
    ]


SERVER = r"""
import http.server, socket, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"peer={self.client_address[0]} path={self.path}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
for port in (80, 81, 82):
    threading.Thread(target=S(("::", port), H).serve_forever, daemon=True).start()
import grpc
from concurrent import futures
def peer(req, ctx):
    return ctx.peer().encode()
handler = grpc.method_handlers_generic_handler("flagella.Test", {
    name: grpc.unary_unary_rpc_method_handler(peer, request_deserializer=None, response_serializer=None)
    for name in ("Allowed", "Denied")})
g = grpc.server(futures.ThreadPoolExecutor(4)); g.add_generic_rpc_handlers((handler,))
g.add_insecure_port("[::]:8080"); g.start()
print("ready", flush=True)
threading.Event().wait()
"""

GRPC_CLIENT = r"""
import grpc, sys
target, method = sys.argv[1], sys.argv[2]
with grpc.insecure_channel(target) as ch:
    try:
        print("OK", ch.unary_unary(method)(b"x", timeout=5).decode())
    except grpc.RpcError as e:
        print("ERR", e.code().name)
"""


@dataclass
class L7Node:
    agent: Agent
    cluster: Cluster
    server: Pod
    client: Pod
    other: Pod
    world: str
    envoy: EnvoyProcess


@pytest.fixture(scope="module")
def l7(system_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[L7Node]:
    agent = Agent(tmp_path_factory.mktemp("agent-l7"), "l7")
    admin_port = free_port()
    with agent.config.open("a") as f:
        f.write(
            "policy: {allow_localhost: policy}\n"
            f"proxy: {{enabled: true, ingress_port: {PORTS.ingress_port}, egress_port: {PORTS.egress_port}, "
            f"reentry_ifname: {PORTS.reentry_ifname}, reentry_peer: {PORTS.reentry_peer}, nft_table: {PORTS.nft_table}, "
            f"envoy_base_id: {PID % 60000 + 3}, admin_port: {admin_port}, start_at_agent_start: true}}\n"
        )
    world = f"sys-{PID}-l7-world"
    cluster: Cluster | None = None
    envoy: EnvoyProcess | None = None
    try:
        agent.start()
        cluster = Cluster(agent)
        pods = {app: cluster.create(app, NS, n, {"app": app}) for app, n in (("server", 40), ("client", 41), ("other", 42))}
        # world: a namespace of our own on TEST-NET-2, routed through the node
        sh("ip", "netns", "add", world)
        wl = f"flw{PID % 100000}"
        sh("ip", "-n", agent.node, "link", "add", wl, "type", "veth", "peer", "name", "eth0", "netns", world)
        sh("ip", "-n", agent.node, "addr", "add", f"{HOST4}/24", "dev", wl)
        sh("ip", "-n", agent.node, "link", "set", wl, "up")
        sh("ip", "-n", world, "addr", "add", f"{WORLD4}/24", "dev", "eth0")
        sh("ip", "-n", world, "link", "set", "eth0", "up")
        sh("ip", "-n", world, "link", "set", "lo", "up")
        sh("ip", "-n", world, "route", "add", "10.244.0.0/16", "via", HOST4)
        sh("ip", "-n", agent.node, "addr", "add", f"{HOST6}/64", "dev", wl, "nodad")
        sh("ip", "-n", world, "addr", "add", f"{WORLD6}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", world, "route", "add", "fd00:10:244::/48", "via", HOST6)
        server_proc = cluster.spawn(pods["server"].netns, sys.executable, "-c", SERVER,
                                    stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        assert server_proc.stdout is not None and server_proc.stdout.readline().strip() == "ready"
        cluster.import_policy(*_policy())
        # The agent's own Envoy, reached on its admin port for stats (not started here).
        envoy = EnvoyProcess(bootstrap("admin-only", "/nonexistent.sock", admin_port, ads=False), base_id=0)
        yield L7Node(agent, cluster, pods["server"], pods["client"], pods["other"], world, envoy)
    finally:
        problems = cluster.close() if cluster is not None else []
        sh("ip", "netns", "del", world, check=False)
        agent.close()
        assert not problems, problems


def curl(netns: str, url: str, http2: bool = False) -> tuple[int, str]:
    """``(status, body)``; status 0: no answer."""
    cmd = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "3", "--connect-timeout", "2"]
    if http2:
        cmd.append("--http2-prior-knowledge")
    out = subprocess.run(["ip", "netns", "exec", netns, *cmd, url], capture_output=True, timeout=10).stdout.decode()
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def url(ip: str, port: int, path: str) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"


FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def _stat(n: L7Node, name: str) -> int:
    with in_netns(n.agent.node):
        return sum(v for k, v in n.envoy.stats(name).items() if k.endswith(name))


@FAMILIES
def test_ingress_rules_for_a_pod_client(l7: L7Node, family: int) -> None:
    dst = l7.server.ip(family)
    before = _stat(l7, "rbac.flagella.denied")
    code, body = curl(l7.client.netns, url(dst, 80, "/public"))
    assert (code, body) == (200, f"peer={_peer(l7.client.ip(family))} path=/public")
    assert curl(l7.client.netns, url(dst, 80, "/private")) == (403, "Access denied\r\n")
    assert _stat(l7, "rbac.flagella.denied") > before  # Envoy said no, not the server
    # other: no L3/L4 rule on port 80, so it is dropped in the kernel: no answer at all
    assert curl(l7.other.netns, url(dst, 80, "/public"))[0] == 0


def _peer(ip: str) -> str:
    """How the dual-stack server prints a peer."""
    return f"::ffff:{ip}" if ":" not in ip else ip


@FAMILIES
def test_ingress_rules_for_world_and_host(l7: L7Node, family: int) -> None:
    dst = l7.server.ip(family)
    world, host = (WORLD4, HOST4) if family == 4 else (WORLD6, HOST6)
    assert curl(l7.world, url(dst, 80, "/public")) == (200, f"peer={_peer(world)} path=/public")
    assert curl(l7.world, url(dst, 80, "/private")) == (403, "Access denied\r\n")
    assert curl(l7.world, url(dst, 81, "/public"))[0] == 0  # L3/L4: world only on 80
    assert curl(l7.agent.node, url(dst, 80, "/public")) == (200, f"peer={_peer(host)} path=/public")
    assert curl(l7.agent.node, url(dst, 80, "/private")) == (403, "Access denied\r\n")


@FAMILIES
def test_egress_rules_of_the_client(l7: L7Node, family: int) -> None:
    dst = l7.server.ip(family)
    assert curl(l7.client.netns, url(dst, 81, "/egress-ok")) == (200, f"peer={_peer(l7.client.ip(family))} path=/egress-ok")
    assert curl(l7.client.netns, url(dst, 81, "/nope")) == (403, "Access denied\r\n")


@FAMILIES
def test_both_sides_on_one_port_apply_both_rule_sets(l7: L7Node, family: int) -> None:
    """The egress proxy's upstream is not redirected again; the server's ingress rules are
    applied in the egress chain instead, so neither side's rules are bypassed."""
    dst = l7.server.ip(family)
    assert curl(l7.client.netns, url(dst, 82, "/both/ok")) == (200, f"peer={_peer(l7.client.ip(family))} path=/both/ok")
    assert curl(l7.client.netns, url(dst, 82, "/both/server-says-no")) == (403, "Access denied\r\n")  # server's rules
    assert curl(l7.client.netns, url(dst, 82, "/elsewhere")) == (403, "Access denied\r\n")  # client's rules


@FAMILIES
def test_cleartext_http2_grpc(l7: L7Node, family: int) -> None:
    dst = l7.server.ip(family)
    target = f"[{dst}]:8080" if family == 6 else f"{dst}:8080"

    def call(method: str) -> str:
        out = subprocess.run(["ip", "netns", "exec", l7.client.netns, sys.executable, "-c", GRPC_CLIENT, target, method],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip()

    got = call("/flagella.Test/Allowed")
    assert got.startswith("OK ipv") and l7.client.ip(family) in got, got
    assert call("/flagella.Test/Denied") == "ERR PERMISSION_DENIED"


def test_proxy_sockets_have_keepalive(l7: L7Node) -> None:
    """Both legs of a proxied connection, downstream (accepted by the listener) and upstream
    (to the pod), have SO_KEEPALIVE: ``ss`` shows a keepalive timer on them."""
    import socket
    import time

    from tests.system._support import pod_socket

    s = pod_socket(l7.client.netns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(3)
        s.connect((l7.server.ipv4, 80))
        s.sendall(b"GET /public HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200" in s.recv(1000)
        time.sleep(0.2)
        out = sh("ss", "-tnoe", "state", "established", netns=l7.agent.node).stdout
        keep = [line for line in out.splitlines() if "timer:(keepalive" in line and l7.client.ipv4 in line]
        assert len(keep) >= 2, out  # the accepted socket and the upstream one
    finally:
        s.close()

