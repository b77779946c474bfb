"""L7 benchmark: what Flagella's RBAC costs Envoy, against no policy and against ext_authz.

Three proxy Envoys, identical but for their HTTP filters, each forwarding to the same
upstream Envoy (a ``direct_response`` 200, so the upstream is never the bottleneck):

* ``plain``: router only, the baseline;
* ``rbac``: Flagella's RBAC config (`flagella.proxy.rbac.http_rbac`), 100 identities
  with one HTTP rule each and 1,000 peer addresses in all; the client's address is in
  the last identity and its request matches only that identity's rule. With this many
  addresses the config is compiled to the matcher API (an IP trie picks the identity);
* ``rbac_rules``: the same policy forced into linear RBAC ``rules`` (what the builder
  emits for small peer sets), to show what the trie buys;
* ``ext_authz``: Envoy asks a Python grpc.aio authorization service (in its own
  process) on every request, and that service evaluates the same 100 rules with
  Flagella's own L7 matcher: the shape of OPA-Envoy and Calico's Dikastes.

Load: ``h2load`` over HTTP/1.1, 16 connections, a fixed duration per round. Rounds
interleave the variants (plain, rbac, rbac_rules, ext_authz, plain, ...) so machine
noise falls on all of them; the result is the median per variant, the ratios of the
medians, and each round's own ratios (its variants ran back to back) with their range.
Each run also records the CPU time per request of the variant's proxy Envoy (plus the
authz service's, for ext_authz), from /proc: on a shared machine it moves far less than
the request rate, and it is the cost the filter adds.

    .venv/bin/python bench/l7.py [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from google.protobuf import json_format

ROOT = Path(__file__).resolve().parents[1]
# bench/xds.py would shadow the ``xds`` protobuf package the Envoy protos import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT / "src"))

from flagella.policy.api import HTTPRule  # noqa: E402
from flagella.policy.l7 import HTTPRequest, http_rule_matches  # noqa: E402
from flagella.policy.mapstate import L7Policy  # noqa: E402
from flagella.proxy import listeners as L  # noqa: E402
from flagella.proxy.envoy import EnvoyProcess, bootstrap, free_port  # noqa: E402
from flagella.proxy.rbac import MATCHER_THRESHOLD, PeerSet, http_rbac  # noqa: E402

IDENTITIES = 100
IPS_PER_IDENTITY = 10
CLIENT = "127.0.0.1"
PATH = f"/api/v{IDENTITIES - 1}/items"
_base = itertools.count(52000 + os.getpid() % 500 * 20)


def policy() -> tuple[dict[int, PeerSet], list[tuple[int, L7Policy]], dict[str, int]]:
    """100 identities x 10 addresses; the client is the last address of the last identity."""
    peers: dict[int, PeerSet] = {}
    redirects = []
    owner: dict[str, int] = {}
    for i in range(IDENTITIES):
        ident = 1000 + i
        addrs = [f"10.{i // 250}.{i % 250}.{j + 1}" for j in range(IPS_PER_IDENTITY)]
        if i == IDENTITIES - 1:
            addrs[-1] = CLIENT
        peers[ident] = PeerSet(tuple(ipaddress.ip_network(f"{a}/32") for a in addrs))
        owner.update({a: ident for a in addrs})
        rule = HTTPRule(method="GET|HEAD", path=f"/api/v{i}/[a-z]+")
        redirects.append((ident, L7Policy("http", frozenset({rule}))))
    return peers, redirects, owner


def _cluster(name: str, address: Any) -> dict[str, Any]:
    return {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]},
    }


def _listener(port: int, filters: list[dict[str, Any]] | None = None, direct: bool = False) -> dict[str, Any]:
    route: dict[str, Any] = {"match": {"prefix": "/"}}
    if direct:
        route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
    else:
        route["route"] = {"cluster": "upstream"}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [*(filters or []), {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    }
    return {
        "name": f"l{port}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def _envoy(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> EnvoyProcess:
    config = bootstrap("bench", "/nonexistent.sock", free_port(),
                       static_resources={"listeners": listeners, "clusters": clusters}, ads=False)
    proc = EnvoyProcess(config, base_id=next(_base))
    proc.start()
    return proc


# -- the ext_authz service (its own process) ------------------------------------------


def _authz_main(sock: str, ready: Any) -> None:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
    from google.rpc import code_pb2, status_pb2

    peers, redirects, owner = policy()
    rules = {ident: l7 for ident, l7 in redirects}

    class Authz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
        async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
            http = request.attributes.request.http
            src = request.attributes.source.address.socket_address.address
            ident = owner.get(src)
            req = HTTPRequest(http.method, http.path, http.host, dict(http.headers))
            l7 = rules.get(ident) if ident is not None else None
            ok = l7 is not None and any(http_rule_matches(r, req) for r in l7.http)
            code = code_pb2.OK if ok else code_pb2.PERMISSION_DENIED
            return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code))

    async def serve() -> None:
        server = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authz(), server)
        server.add_insecure_port(f"unix://{sock}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(serve())


# -- load ---------------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` (from /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


WARM_UP_S = 1


def h2load(port: int, duration: float, pids: list[int]) -> tuple[float, float]:
    """(requests per second, CPU microseconds per request of ``pids``): the rate is what
    the issue targets; the CPU cost of the proxy (and of the authz service) per request
    is what machine noise disturbs least."""
    proc = subprocess.Popen(
        ["h2load", "--h1", "-c", "16", "-t", "1", "-D", str(max(1, round(duration))), "--warm-up-time",
         str(WARM_UP_S), f"http://127.0.0.1:{port}{PATH}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    time.sleep(WARM_UP_S)
    cpu0 = cpu_seconds(pids)
    out, _ = proc.communicate(timeout=duration + 60)
    cpu = cpu_seconds(pids) - cpu0
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not m or not done or not codes or int(codes.group(1)) == 0 or int(codes.group(3)) or int(codes.group(4)):
        raise SystemExit(f"h2load failed or saw denials on port {port}:\n{out}")
    return float(m.group(1)), cpu * 1e6 / max(1, int(done.group(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    peers, redirects, _ = policy()
    def rbac_filter(threshold: int) -> dict[str, Any]:
        rbac = http_rbac(redirects, peers, egress=False, matcher_threshold=threshold)
        return {"name": "envoy.filters.http.rbac",
                "typed_config": json_format.MessageToDict(L.packed(rbac), preserving_proto_field_name=True)}
    tmp = Path(tempfile.mkdtemp(prefix="flagella-bench-l7-"))
    authz_sock = str(tmp / "authz.sock")
    authz_filter = {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "5s"},
    }}
    authz_cluster = _cluster("authz", {"pipe": {"path": authz_sock}})
    authz_cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    authz = ctx.Process(target=_authz_main, args=(authz_sock, ready), daemon=True)
    authz.start()
    envoys: list[EnvoyProcess] = []
    try:
        if not ready.wait(30):
            raise SystemExit("the ext_authz service did not start")
        up_port = free_port()
        envoys.append(_envoy([_listener(up_port, direct=True)], []))
        upstream = _cluster("upstream", {"socket_address": {"address": "127.0.0.1", "port_value": up_port}})
        ports = {name: free_port() for name in ("plain", "rbac", "rbac_rules", "ext_authz")}
        proxies = {
            "plain": _envoy([_listener(ports["plain"])], [upstream]),
            "rbac": _envoy([_listener(ports["rbac"], [rbac_filter(MATCHER_THRESHOLD)])], [upstream]),
            "rbac_rules": _envoy([_listener(ports["rbac_rules"], [rbac_filter(10**9)])], [upstream]),
            "ext_authz": _envoy([_listener(ports["ext_authz"], [authz_filter])], [upstream, authz_cluster]),
        }
        envoys += proxies.values()
        assert authz.pid is not None
        # CPU charged to each variant: its proxy Envoy (and for ext_authz, the authz service).
        pids = {n: [p.proc.pid] for n, p in proxies.items() if p.proc is not None}
        pids["ext_authz"].append(authz.pid)
        results: dict[str, list[float]] = {name: [] for name in ports}
        cpu_us: dict[str, list[float]] = {name: [] for name in ports}
        started = time.time()
        for i in range(args.rounds):
            order = list(ports.items())
            for name, port in order if i % 2 == 0 else reversed(order):  # no variant always first
                rate, cost = h2load(port, args.duration, pids[name])
                results[name].append(rate)
                cpu_us[name].append(cost)
        med = {name: statistics.median(v) for name, v in results.items()}
        # Each round runs the variants back to back: its own ratios are the paired measure.
        paired = {
            "rbac_vs_plain": [r / p for r, p in zip(results["rbac"], results["plain"], strict=True)],
            "rbac_rules_vs_plain": [r / p for r, p in zip(results["rbac_rules"], results["plain"], strict=True)],
            "rbac_vs_ext_authz": [r / a for r, a in zip(results["rbac"], results["ext_authz"], strict=True)],
        }
        report = {
            "duration_s": args.duration, "rounds": args.rounds, "wall_s": round(time.time() - started, 1),
            "rbac_policies": IDENTITIES, "rbac_peer_ips": IDENTITIES * IPS_PER_IDENTITY,
            "req_per_s": {n: [round(x) for x in v] for n, v in results.items()},
            "median_req_per_s": {n: round(v) for n, v in med.items()},
            "ratio_rbac_vs_plain": round(med["rbac"] / med["plain"], 3),
            "ratio_rbac_rules_vs_plain": round(med["rbac_rules"] / med["plain"], 3),
            "ratio_rbac_vs_ext_authz": round(med["rbac"] / med["ext_authz"], 2),
            "per_round_ratios": {n: [round(x, 3) for x in v] for n, v in paired.items()},
            "per_round_range": {n: [round(min(v), 3), round(max(v), 3)] for n, v in paired.items()},
            "cpu_us_per_request": {n: [round(x, 1) for x in v] for n, v in cpu_us.items()},
            "median_cpu_us_per_request": {n: round(statistics.median(v), 1) for n, v in cpu_us.items()},
        }
        print(json.dumps(report, indent=2))
        print(f"\nplain {med['plain']:.0f} req/s | Flagella RBAC {med['rbac']:.0f} req/s "
              f"({report['ratio_rbac_vs_plain']:.3f} of plain; target >= 0.9; linear rules "
              f"{report['ratio_rbac_rules_vs_plain']:.3f}) | ext_authz {med['ext_authz']:.0f} "
              f"req/s (Flagella {report['ratio_rbac_vs_ext_authz']:.1f}x; target >= 4x)")
        cpu = report["median_cpu_us_per_request"]
        print("CPU us/request (proxy Envoy; ext_authz + its service): "
              + ", ".join(f"{n} {v}" for n, v in cpu.items()))
    finally:
        for e in envoys:
            e.stop()
        authz.terminate()
        authz.join(5)


if __name__ == "__main__":
    main()
