"""Redirect benchmark: what handing a pod's flows to the node Envoy costs, against plain
pod-to-pod through the same datapath.

One agent (in a node namespace of its own, proxy plumbing on), a client and a server pod.
The server runs an Envoy with a ``direct_response`` 200 on two ports, so it is never the
bottleneck. The server's ingress policy allows the client on both ports; on port 80 with a
wildcard HTTP rule (every request allowed, but the flow goes through the kernel redirect,
the re-entry device, TPROXY and the node Envoy with its RBAC filter, and out again with
``original_src``), on port 81 at L3/L4 only (the BPF verdict, no proxy). The node Envoy
runs the static bootstrap of `flagella.proxy.static`.

Load: ``h2load --h1`` from inside the client pod, 16 connections, a fixed duration per
round; rounds alternate plain and redirect so machine noise falls on both; the result is
the median per variant and the ratio.

    .venv/bin/python bench/redirect.py [--duration 5] [--rounds 3]   (root)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# bench/xds.py would shadow the ``xds`` protobuf package the Envoy protos import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.system._support import PID, Agent, Cluster, in_netns, prepare_host, sweep_stale  # noqa: E402

from flagella.policy.api import load_policies  # noqa: E402
from flagella.policy.engine import PolicyEngine  # noqa: E402
from flagella.policy.labels import k8s_labels  # noqa: E402
from flagella.policy.resolver import EndpointInfo, PolicySettings  # noqa: E402
from flagella.policy.trace import reserved_identity_labels  # noqa: E402
from flagella.proxy.envoy import EnvoyProcess, bootstrap, free_port  # noqa: E402
from flagella.proxy.l7policy import direction_http_policy  # noqa: E402
from flagella.proxy.ports import ProxySettings  # noqa: E402
from flagella.proxy.rbac import peer_sets  # noqa: E402
from flagella.proxy.static import static_bootstrap  # noqa: E402

NS = "bench-rd"
PORTS = ProxySettings(enabled=True, ingress_port=15201, egress_port=15202)
SERVER_ID, CLIENT_ID = 1000, 1001


def _policy() -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "bench-redirect", "namespace": NS},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"app": "client"}}],
                "toPorts": [
                    {"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{}]}},
                    {"ports": [{"port": "81", "protocol": "TCP"}]},
                ],
            }],
        },
    }


def _direct_listener(port: int) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "name": f"l{port}",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def _node_proxy(server_ips: list[str], client_ips: list[str]) -> dict[str, Any]:
    engine = PolicyEngine(PolicySettings())
    engine.upsert_policies(load_policies(json.dumps([_policy()])))
    for ident, labels in reserved_identity_labels().items():
        engine.set_identity(ident, labels)
    for app, ident in (("server", SERVER_ID), ("client", CLIENT_ID)):
        labels = k8s_labels({"app": app}, NS)
        engine.set_identity(ident, labels)
        engine.upsert_endpoint(EndpointInfo(ident, ident, labels))
    ipcache = {ipaddress.ip_network(ip): CLIENT_ID for ip in client_ips}
    ipcache.update({ipaddress.ip_network(ip): SERVER_ID for ip in server_ips})
    ingress = direction_http_policy(
        SERVER_ID, [ipaddress.ip_interface(a).ip for a in server_ips], engine.policy(SERVER_ID).ingress, False,
        peer_sets(ipcache),
    ).ports
    return static_bootstrap(f"bench-{PID}", free_port(), PORTS, ingress, [])


def h2load(netns: str, url: str, duration: float) -> float:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "h2load", "--h1", "-c", "16", "-t", "1", "-D", str(max(1, round(duration))),
         "--warm-up-time", "1", url],
        capture_output=True, text=True, timeout=duration + 60,
    ).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not m or not codes or int(codes.group(1)) == 0 or int(codes.group(3)) or int(codes.group(4)):
        raise SystemExit(f"h2load failed or saw errors on {url}:\n{out}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    prepare_host()  # root, tools, netguard on
    sweep_stale()
    agent = Agent(Path(tempfile.mkdtemp(prefix="flagella-bench-redirect-")), "bench-rd")
    with agent.config.open("a") as f:
        f.write(f"proxy: {{enabled: true, ingress_port: {PORTS.ingress_port}, egress_port: {PORTS.egress_port}}}\n")
    cluster: Cluster | None = None
    envoys: list[EnvoyProcess] = []
    try:
        agent.start()
        cluster = Cluster(agent)
        server = cluster.create("server", NS, 60, {"app": "server"})
        client = cluster.create("client", NS, 61, {"app": "client"})
        cluster.import_policy(_policy())
        upstream = EnvoyProcess(
            bootstrap("bench-up", "/nonexistent.sock", free_port(),
                      static_resources={"listeners": [_direct_listener(80), _direct_listener(81)]}, ads=False),
            base_id=PID % 30000 + 30001,
        )
        node = EnvoyProcess(_node_proxy([f"{server.ipv4}/32", f"{server.ipv6}/128"],
                                        [f"{client.ipv4}/32", f"{client.ipv6}/128"]), base_id=PID % 30000)
        with in_netns(server.netns):
            upstream.start()
        envoys.append(upstream)
        with in_netns(agent.node):
            node.start()
        envoys.append(node)
        urls = {"plain": f"http://{server.ipv4}:81/", "redirect": f"http://{server.ipv4}:80/"}
        results: dict[str, list[float]] = {name: [] for name in urls}
        started = time.time()
        for _ in range(args.rounds):
            for name, url in urls.items():
                results[name].append(h2load(client.netns, url, args.duration))
        with in_netns(agent.node):
            proxied = sum(v for k, v in node.stats("rbac.flagella.allowed").items() if k.endswith("allowed"))
        if proxied == 0:
            raise SystemExit("the node Envoy saw no request: the redirect path was not taken")
        med = {name: statistics.median(v) for name, v in results.items()}
        report = {
            "duration_s": args.duration, "rounds": args.rounds, "wall_s": round(time.time() - started, 1),
            "req_per_s": {n: [round(x) for x in v] for n, v in results.items()},
            "median_req_per_s": {n: round(v) for n, v in med.items()},
            "ratio_redirect_vs_plain": round(med["redirect"] / med["plain"], 3),
            "requests_through_node_envoy": proxied,
        }
        print(json.dumps(report, indent=2))
        print(f"\nplain pod-to-pod {med['plain']:.0f} req/s | through the redirect and the node Envoy "
              f"{med['redirect']:.0f} req/s ({report['ratio_redirect_vs_plain']:.3f} of plain)")
    finally:
        for e in envoys:
            e.stop()
        if cluster is not None:
            cluster.close()
        agent.close()


if __name__ == "__main__":
    main()
