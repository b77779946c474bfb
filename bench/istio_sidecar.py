"""Istio sidecar benchmark: requests/s through a sidecar-shaped Envoy with and without
Flagella's ECDS RBAC filter, side by side.

The path is Istio's two-proxy hop (spec xds-envoy-istio 3.2): h2load speaks plain
HTTP/1.1 to a client-side Envoy standing for luke's sidecar (outbound), which
originates mutual TLS with luke's SPIFFE certificate (ALPN ``istio-http/1.1``, source
address luke's pod IP) to one of two inbound sidecars for leia
(tests/istio/sidecar_harness.py: Istio's ``virtualInbound`` shape, STRICT mTLS):

* ``istio``: Istio's own (empty) RBAC filter and the router;
* ``flagella``: the same plus Flagella's filter exactly as manifests/istio/envoyfilter.yaml
  inserts it, its config (the release notes' policy: luke may GET /public, as SPIFFE id
  AND source address) fetched over google_grpc from a real XdsServer.

Both forward to the same app stand-in, an Envoy ``direct_response`` 200, so the app is
never the bottleneck. Every response must be 2xx (a denial fails the run). Rounds
interleave the two variants; the result is the median per variant and their ratio.

    .venv/bin/python bench/istio_sidecar.py [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
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

from tests.istio.sidecar_harness import make_ca, make_leaf, sidecar_config, start_sidecar  # noqa: E402

from flagella.istio.publisher import IstioPublisher  # noqa: E402
from flagella.istio.workload import IstioSettings, node_id, workload_rbac  # noqa: E402
from flagella.policy.api import load_policies  # noqa: E402
from flagella.policy.engine import PolicyEngine  # noqa: E402
from flagella.policy.labels import k8s_labels  # noqa: E402
from flagella.policy.resolver import EndpointInfo, PolicySettings  # noqa: E402
from flagella.proxy.envoy import EnvoyProcess, bootstrap, free_port  # noqa: E402
from flagella.proxy.rbac import peer_sets  # noqa: E402
from flagella.xds.server import XdsServer, XdsSettings  # noqa: E402
from flagella.xds.types import EXTENSION_CONFIG  # noqa: E402

NET = f"127.78.{os.getpid() % 250}"
LEIA_FLAGELLA, LEIA_ISTIO, LUKE = f"{NET}.1", f"{NET}.2", f"{NET}.3"
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: leia, namespace: default}
spec:
  endpointSelector: {matchLabels: {io.cilium.k8s.policy.serviceaccount: leia}}
  ingress:
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.serviceaccount: luke}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}]}
"""


def rbac_config() -> Any:
    engine = PolicyEngine(PolicySettings())
    engine.upsert_policies(load_policies(POLICY))
    idents = {300: k8s_labels({"app": "luke"}, "default", service_account="luke"),
              256: k8s_labels({"app": "leia"}, "default", service_account="leia")}
    for i, ls in idents.items():
        engine.set_identity(i, ls)
    engine.upsert_endpoint(EndpointInfo(1, 256, idents[256]))
    ipcache = {ipaddress.ip_network(f"{LUKE}/32"): 300, ipaddress.ip_network(f"{LEIA_FLAGELLA}/32"): 256}
    return workload_rbac(engine.policy(1).ingress, peer_sets(ipcache), idents, IstioSettings())


def _tls_cluster(name: str, address: str, cert: tuple[Path, Path], ca: Path) -> dict[str, Any]:
    return {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "upstream_bind_config": {"source_address": {"address": LUKE, "port_value": 0}},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": address, "port_value": 80}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["istio-http/1.1"],
                "tls_certificates": [{"certificate_chain": {"filename": str(cert[0])},
                                      "private_key": {"filename": str(cert[1])}}],
                "validation_context": {"trusted_ca": {"filename": str(ca)}},
            },
        }},
    }


def _listener(port: int, cluster: str | None) -> dict[str, Any]:
    route: dict[str, Any] = ({"route": {"cluster": cluster}} if cluster
                             else {"direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": f"l{port}",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, **route}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {"name": f"l{port}", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def _static_envoy(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> EnvoyProcess:
    config = bootstrap("bench", "/nonexistent.sock", free_port(),
                       static_resources={"listeners": listeners, "clusters": clusters}, ads=False)
    config["static_resources"]["clusters"] = clusters
    proc = EnvoyProcess(config, base_id=60000 + os.getpid() % 1000 * 10 + len(listeners) + len(clusters))
    proc.start()
    return proc


def h2load(port: int, duration: float) -> float:
    out = subprocess.run(
        ["h2load", "--h1", "-c", "16", "-t", "1", "-D", str(max(1, round(duration))), "--warm-up-time", "1",
         f"http://127.0.0.1:{port}/public"],
        capture_output=True, text=True, timeout=duration + 60,
    ).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not m or not codes or int(codes.group(1)) == 0 or int(codes.group(3)) or int(codes.group(4)):
        raise SystemExit(f"h2load failed or saw denials on port {port}:\n{out}")
    return float(m.group(1))


async def run(duration: int, rounds: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="flagella-istio-bench-"))
    ca = make_ca(work)
    leia, luke = make_leaf(work, "default", "leia"), make_leaf(work, "default", "luke")
    app_port, port_flagella, port_istio = free_port(), free_port(), free_port()
    procs: list[EnvoyProcess] = []
    server = XdsServer(XdsSettings(unix_socket=work / "xds.sock", debounce_quiet=0.05))
    await server.start()
    try:
        publisher = IstioPublisher(server)
        publisher.publish("leia-1", "default", [ipaddress.ip_address(LEIA_FLAGELLA)], rbac_config())
        procs.append(await asyncio.to_thread(_static_envoy, [_listener(app_port, None)], []))
        for pod, ip, flagella in (("leia-1", LEIA_FLAGELLA, True), ("leia-2", LEIA_ISTIO, False)):
            config = sidecar_config(pod, "default", ip, 80, app_port, leia, ca, work / "xds.sock", flagella=flagella)
            procs.append(await asyncio.to_thread(start_sidecar, config))
        node = node_id("leia-1", "default", ipaddress.ip_address(LEIA_FLAGELLA))
        want = server.cache.view(node, EXTENSION_CONFIG).version
        while not any(r.node == node and any(t.version_acked == want for t in r.types) for r in server.status()):
            await asyncio.sleep(0.05)
        procs.append(await asyncio.to_thread(
            _static_envoy,
            [_listener(port_flagella, "to-flagella"), _listener(port_istio, "to-istio")],
            [_tls_cluster("to-flagella", LEIA_FLAGELLA, luke, ca), _tls_cluster("to-istio", LEIA_ISTIO, luke, ca)],
        ))
        results: dict[str, list[float]] = {"istio": [], "flagella": []}
        started = time.time()
        for _ in range(rounds):
            for name, port in (("istio", port_istio), ("flagella", port_flagella)):
                results[name].append(await asyncio.to_thread(h2load, port, duration))
        med = {n: statistics.median(v) for n, v in results.items()}
        sidecar = procs[1]  # leia-1, with Flagella's filter: it must have judged the requests
        allowed = {k: v for k, v in (await asyncio.to_thread(sidecar.stats, "rbac")).items()
                   if "flagella" in k and k.endswith(".allowed")}
        if not allowed or max(allowed.values()) == 0:
            raise SystemExit(f"Flagella's RBAC filter did not run: {allowed}")
        return {
            "duration_s": duration, "rounds": rounds, "wall_s": round(time.time() - started, 1),
            "req_per_s": {n: [round(x) for x in v] for n, v in results.items()},
            "median_req_per_s": {n: round(v) for n, v in med.items()},
            "flagella_rbac_allowed": allowed,
            "ratio_flagella_vs_istio": round(med["flagella"] / med["istio"], 3),
        }
    finally:
        for p in procs:
            await asyncio.to_thread(p.stop)
        await server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.duration, args.rounds)), indent=2))


if __name__ == "__main__":
    main()
