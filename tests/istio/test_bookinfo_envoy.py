"""Spec 10(c) bookinfo: productpage, reviews and ratings rules in real Envoy sidecars, over mTLS.

``manifests/istio/bookinfo-policies.yaml`` is resolved by the real engine
for every bookinfo pod; four pods get a real sidecar Envoy
(`tests.istio.sidecar_harness`) fed by one `XdsServer` through
`IstioPublisher`, each under its own node id. Peers send requests with the
certificate of their service account (reviews-v1 and reviews-v2 share one)
from their own address (127.79.<n>.x stands for pod IPs).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from pathlib import Path

from flagella.istio.publisher import IstioPublisher
from flagella.istio.workload import IstioSettings, node_id, workload_rbac
from flagella.policy.api import load_policies
from flagella.policy.engine import PolicyEngine
from flagella.policy.labels import LabelSet, k8s_labels
from flagella.policy.resolver import EndpointInfo, PolicySettings
from flagella.proxy.envoy import EnvoyProcess
from flagella.proxy.rbac import peer_sets
from flagella.xds.server import XdsServer, XdsSettings
from tests.istio.sidecar_harness import make_ca, make_leaf, request, sidecar_config, start_sidecar
from tests.istio.test_sidecar_envoy import _acked
from tests.proxy.test_rbac_envoy import upstream  # noqa: F401 (fixture)

MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "istio" / "bookinfo-policies.yaml"
NET = f"127.79.{os.getpid() % 250}"
PORT = 9080

#: pod: (identity, app, version, service account, address)
PODS = {
    "productpage-v1": (500, "productpage", "v1", "bookinfo-productpage", f"{NET}.1"),
    "productpage-v2": (501, "productpage", "v2", "bookinfo-productpage", f"{NET}.2"),
    "reviews-v1": (502, "reviews", "v1", "bookinfo-reviews", f"{NET}.3"),
    "reviews-v2": (503, "reviews", "v2", "bookinfo-reviews", f"{NET}.4"),
    "ratings-v1": (504, "ratings", "v1", "bookinfo-ratings", f"{NET}.5"),
    "details-v1": (505, "details", "v1", "bookinfo-details", f"{NET}.6"),
    "gateway": (506, "istio-ingressgateway", "", "istio-ingressgateway", f"{NET}.7"),
}
MESHED = ("productpage-v1", "productpage-v2", "reviews-v1", "ratings-v1")


def _labels(pod: str) -> LabelSet:
    _, app, version, sa, _ = PODS[pod]
    return k8s_labels({"app": app, **({"version": version} if version else {})}, "default", service_account=sa)


def test_bookinfo_rules_in_sidecars(tmp_path: Path, upstream: int) -> None:  # noqa: F811
    asyncio.run(asyncio.wait_for(_scenario(tmp_path, upstream), 180))


async def _scenario(tmp_path: Path, app_port: int) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki)
    certs = {sa: make_leaf(pki, "default", sa) for sa in {p[3] for p in PODS.values()}}
    engine = PolicyEngine(PolicySettings())
    engine.upsert_policies(load_policies(MANIFEST.read_text()))
    identities = {PODS[p][0]: _labels(p) for p in PODS}
    for ident, labels in identities.items():
        engine.set_identity(ident, labels)
    for pod in MESHED:
        ident, *_, addr = PODS[pod]
        engine.upsert_endpoint(EndpointInfo(ident, ident, identities[ident],
                                            addresses=frozenset({ipaddress.ip_address(addr)})))
    peers = peer_sets({ipaddress.ip_network(f"{p[4]}/32"): p[0] for p in PODS.values()})

    sock = tmp_path / "xds.sock"
    server = XdsServer(XdsSettings(unix_socket=sock, debounce_quiet=0.05, ack_timeout=20))
    await server.start()
    envoys: list[EnvoyProcess] = []
    try:
        publisher = IstioPublisher(server)
        for pod in MESHED:
            ident, *_, sa, addr = PODS[pod]
            config = workload_rbac(engine.policy(ident).ingress, peers, identities, IstioSettings())
            publisher.publish(pod, "default", [ipaddress.ip_address(addr)], config)
            envoys.append(await asyncio.to_thread(
                start_sidecar, sidecar_config(pod, "default", addr, PORT, app_port, certs[sa], ca, sock)
            ))
        for pod in MESHED:
            await asyncio.wait_for(_acked(server, node_id(pod, "default", ipaddress.ip_address(PODS[pod][4]))), 40)

        async def req(src: str, dst: str, path: str, method: str = "GET", cert: str | None = None) -> int:
            sa = cert or PODS[src][3]
            return await asyncio.to_thread(request, PODS[dst][4], PORT, path, PODS[src][4], certs[sa], ca, method)

        # productpage-v1: any source, the page and the whole product API.
        for path in ("/", "/productpage", "/api/v1/products", "/api/v1/products/0", "/api/v1/products/0/reviews",
                     "/api/v1/products/0/ratings"):
            assert await req("gateway", "productpage-v1", path) == 200, path
        assert await req("gateway", "productpage-v1", "/login", method="POST") == 200
        assert await req("gateway", "productpage-v1", "/login") == 403  # GET: not in the list
        assert await req("gateway", "productpage-v1", "/admin") == 403
        # productpage-v2: the same list without the reviews and ratings API (step 5: "Access denied").
        assert await req("gateway", "productpage-v2", "/api/v1/products/0") == 200
        assert await req("gateway", "productpage-v2", "/api/v1/products/0/reviews") == 403
        assert await req("gateway", "productpage-v2", "/api/v1/products/0/ratings") == 403
        # reviews-v1: from productpage only, GET /reviews/<n>.
        assert await req("productpage-v1", "reviews-v1", "/reviews/0") == 200
        assert await req("productpage-v2", "reviews-v1", "/reviews/1") == 200
        assert await req("productpage-v1", "reviews-v1", "/ratings/0") == 403
        assert await req("ratings-v1", "reviews-v1", "/reviews/0") == 403
        assert await req("gateway", "reviews-v1", "/reviews/0") == 403
        # ratings-v1: productpage-v1 and reviews-v2, not reviews-v1 (same service account as v2).
        assert await req("productpage-v1", "ratings-v1", "/ratings/0") == 200
        assert await req("reviews-v2", "ratings-v1", "/ratings/0") == 200
        assert await req("reviews-v1", "ratings-v1", "/ratings/0") == 403
        assert await req("productpage-v2", "ratings-v1", "/ratings/0") == 403
        assert await req("productpage-v1", "ratings-v1", "/ratings/0", method="POST") == 403
        assert await req("productpage-v1", "ratings-v1", "/ratings/x") == 403
        # productpage-v1's certificate from details' address: principal and address disagree.
        assert await req("details-v1", "ratings-v1", "/ratings/0", cert="bookinfo-productpage") == 403
    finally:
        await server.stop()
        for envoy in envoys:
            await asyncio.to_thread(envoy.stop)


def test_manifest_has_every_spec_policy() -> None:
    names = {p.name for p in load_policies(MANIFEST.read_text())}
    assert names == {"productpage-v1", "productpage-v2", "details-v1", "reviews-v1", "reviews-v2", "ratings-v1",
                     "kafka-authaudit"}
