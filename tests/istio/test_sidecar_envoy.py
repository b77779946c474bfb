"""Flagella's ECDS policy enforced by a real Envoy shaped like an Istio sidecar, over mTLS.

The release notes' example: service account ``luke`` may ``GET /public`` on
``leia`` port 80. Policies are resolved by the real engine, published by
`IstioPublisher` on a real `XdsServer`, fetched by the sidecar's filter over
``google_grpc`` from the unix socket, and enforced on requests that arrive
over mutual TLS with SPIFFE client certificates. Each workload's address is a
loopback address of its own (127.77.<n>.x) standing for its pod IP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from pathlib import Path

import pytest
import structlog.testing

from flagella.istio.publisher import IstioPublisher
from flagella.istio.workload import IstioSettings, node_id, workload_rbac
from flagella.policy.api import load_policies
from flagella.policy.engine import PolicyEngine
from flagella.policy.labels import LabelSet, k8s_labels
from flagella.policy.resolver import EndpointInfo, PolicySettings
from flagella.proxy.rbac import peer_sets
from flagella.xds.server import XdsServer, XdsSettings
from flagella.xds.types import EXTENSION_CONFIG
from tests.istio.sidecar_harness import make_ca, make_leaf, request, sidecar_config, start_sidecar
from tests.proxy.test_rbac_envoy import upstream  # noqa: F401 (fixture)

NET = f"127.77.{os.getpid() % 250}"
LEIA, LUKE, VADER = f"{NET}.1", f"{NET}.2", f"{NET}.3"
NODE = node_id("leia-7d4b9", "default", ipaddress.ip_address(LEIA))

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
UPDATED = POLICY.replace("path: /public}", "path: /public}, {method: GET, path: /health}")


def _engine(policy: str) -> tuple[PolicyEngine, dict[int, LabelSet]]:
    engine = PolicyEngine(PolicySettings())
    engine.upsert_policies(load_policies(policy))
    identities = {
        300: k8s_labels({"app": "luke"}, "default", service_account="luke"),
        301: k8s_labels({"app": "vader"}, "default", service_account="vader"),
        256: k8s_labels({"app": "leia"}, "default", service_account="leia"),
    }
    for ident, labels in identities.items():
        engine.set_identity(ident, labels)
    engine.upsert_endpoint(EndpointInfo(1, 256, identities[256], addresses=frozenset({ipaddress.ip_address(LEIA)})))
    return engine, identities


def _config(policy: str) -> object:
    engine, identities = _engine(policy)
    ipcache = {ipaddress.ip_network(f"{ip}/32"): i for i, ip in ((300, LUKE), (301, VADER), (256, LEIA))}
    return workload_rbac(engine.policy(1).ingress, peer_sets(ipcache), identities, IstioSettings())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path] | Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    return {"ca": ca, **{sa: make_leaf(d, "default", sa) for sa in ("leia", "luke", "vader")}}


def test_luke_gets_public_over_mtls_update_outage_and_fail_closed(
    tmp_path: Path, upstream: int, pki: dict  # noqa: F811
) -> None:
    asyncio.run(asyncio.wait_for(_scenario(tmp_path, upstream, pki), 120))


async def _acked(server: XdsServer, node: str) -> None:
    """Until ``node``'s sidecar is connected and has ACKed what the cache holds for it."""
    want = server.cache.view(node, EXTENSION_CONFIG).version
    while not any(
        row.node == node and any(t.type_url == EXTENSION_CONFIG and t.version_acked == want for t in row.types)
        for row in server.status()
    ):
        await asyncio.sleep(0.05)


async def _scenario(tmp_path: Path, app_port: int, pki: dict) -> None:
    sock = tmp_path / "xds.sock"
    ca = pki["ca"]
    config = sidecar_config("leia-7d4b9", "default", LEIA, 80, app_port, pki["leia"], ca, sock)
    envoy = await asyncio.to_thread(start_sidecar, config)
    server = XdsServer(XdsSettings(unix_socket=sock, debounce_quiet=0.05, ack_timeout=20))

    async def req(path: str, source: str, sa: str, method: str = "GET") -> int:
        return await asyncio.to_thread(request, LEIA, 80, path, source, pki[sa], ca, method)

    try:
        # Fail closed: no ECDS server yet, the EnvoyFilter's default_config (deny-all) applies.
        assert await req("/public", LUKE, "luke") == 403
        pid = envoy.proc.pid if envoy.proc else 0

        await server.start()
        publisher = IstioPublisher(server)
        await asyncio.wait_for(
            publisher.publish("leia-7d4b9", "default", [ipaddress.ip_address(LEIA)], _config(POLICY)), 20
        )
        await asyncio.wait_for(_acked(server, NODE), 30)  # the sidecar reconnects after its backoff
        assert await req("/public", LUKE, "luke") == 200
        assert await req("/public?x=1", LUKE, "luke") == 403  # full match on :path
        assert await req("/private", LUKE, "luke") == 403
        assert await req("/public", LUKE, "luke", method="POST") == 403
        assert await req("/public", VADER, "vader") == 403  # another service account
        # Attacks: luke's stolen certificate from vader's pod, and vader's certificate from luke's address.
        assert await req("/public", VADER, "luke") == 403
        assert await req("/public", LUKE, "vader") == 403
        assert await req("/health", LUKE, "luke") == 403

        # A policy update applies without restarting the sidecar.
        await asyncio.wait_for(
            publisher.publish("leia-7d4b9", "default", [ipaddress.ip_address(LEIA)], _config(UPDATED)), 20
        )
        await asyncio.wait_for(_acked(server, NODE), 30)
        assert await req("/health", LUKE, "luke") == 200
        assert await req("/health", VADER, "vader") == 403
        assert envoy.proc is not None and envoy.proc.pid == pid and envoy.running

        # Agent outage: the ECDS server goes away, the last config stays in force.
        await server.stop()
        await asyncio.sleep(1.0)
        assert await req("/health", LUKE, "luke") == 200
        assert await req("/public", LUKE, "luke") == 200
        assert await req("/private", LUKE, "luke") == 403
        assert await req("/public", VADER, "vader") == 403
        assert envoy.running
    finally:
        await server.stop()
        await asyncio.to_thread(envoy.stop)


BOOKINFO = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ratings-v1, namespace: default}
specs:
- endpointSelector: {matchLabels: {"k8s:app": ratings, "k8s:version": v1}}
  ingress:
  - fromEndpoints:
    - {matchLabels: {"k8s:app": productpage, "k8s:version": v1}}
    - {matchLabels: {"k8s:app": reviews, "k8s:version": v2}}
    toPorts:
    - ports: [{port: "9080", protocol: TCP}]
      rules: {http: [{method: GET, path: "/ratings/[0-9]*"}]}
"""
RATINGS, PRODUCTPAGE, REVIEWS_V1, REVIEWS_V2 = f"{NET}.11", f"{NET}.12", f"{NET}.13", f"{NET}.14"


def test_bookinfo_ratings_over_mtls(tmp_path: Path, upstream: int, pki: dict) -> None:  # noqa: F811
    asyncio.run(asyncio.wait_for(_bookinfo(tmp_path, upstream, pki), 120))


async def _bookinfo(tmp_path: Path, app_port: int, pki: dict) -> None:
    """Spec 10(c): ratings-v1 admits GET /ratings/<n> from productpage-v1 and reviews-v2 only.

    reviews-v1 and reviews-v2 share the service account ``bookinfo-reviews``
    (one certificate): the label selector tells them apart by address."""
    d = tmp_path / "pki"
    d.mkdir()
    for name in ("ca.pem", "ca.key"):
        (d / name).write_bytes(Path(pki["ca"]).with_name(name).read_bytes())
    ca = d / "ca.pem"
    certs = {sa: make_leaf(d, "default", sa) for sa in ("bookinfo-ratings", "bookinfo-productpage", "bookinfo-reviews")}
    engine = PolicyEngine(PolicySettings())
    engine.upsert_policies(load_policies(BOOKINFO))
    pods = {  # identity: (labels, address)
        400: (k8s_labels({"app": "ratings", "version": "v1"}, "default", service_account="bookinfo-ratings"), RATINGS),
        401: (k8s_labels({"app": "productpage", "version": "v1"}, "default", service_account="bookinfo-productpage"),
              PRODUCTPAGE),
        402: (k8s_labels({"app": "reviews", "version": "v1"}, "default", service_account="bookinfo-reviews"), REVIEWS_V1),
        403: (k8s_labels({"app": "reviews", "version": "v2"}, "default", service_account="bookinfo-reviews"), REVIEWS_V2),
    }
    for ident, (labels, _) in pods.items():
        engine.set_identity(ident, labels)
    engine.upsert_endpoint(EndpointInfo(1, 400, pods[400][0], addresses=frozenset({ipaddress.ip_address(RATINGS)})))
    ipcache = {ipaddress.ip_network(f"{ip}/32"): i for i, (_, ip) in pods.items()}
    config = workload_rbac(engine.policy(1).ingress, peer_sets(ipcache), {i: ls for i, (ls, _) in pods.items()},
                           IstioSettings())

    sock = tmp_path / "xds.sock"
    server = XdsServer(XdsSettings(unix_socket=sock, debounce_quiet=0.05, ack_timeout=20))
    await server.start()
    envoy = None
    try:
        publisher = IstioPublisher(server)
        publisher.publish("ratings-v1-5f9", "default", [ipaddress.ip_address(RATINGS)], config)
        envoy = await asyncio.to_thread(
            start_sidecar,
            sidecar_config("ratings-v1-5f9", "default", RATINGS, 9080, app_port, certs["bookinfo-ratings"], ca, sock),
        )
        await asyncio.wait_for(_acked(server, node_id("ratings-v1-5f9", "default", ipaddress.ip_address(RATINGS))), 30)

        async def req(path: str, source: str, sa: str, method: str = "GET") -> int:
            return await asyncio.to_thread(request, RATINGS, 9080, path, source, certs[sa], ca, method)

        assert await req("/ratings/0", PRODUCTPAGE, "bookinfo-productpage") == 200
        assert await req("/ratings/0", REVIEWS_V2, "bookinfo-reviews") == 200
        assert await req("/ratings/0", REVIEWS_V1, "bookinfo-reviews") == 403
        assert await req("/ratings/0", PRODUCTPAGE, "bookinfo-productpage", method="POST") == 403
        assert await req("/ratings/x", PRODUCTPAGE, "bookinfo-productpage") == 403
        assert await req("/details/0", REVIEWS_V2, "bookinfo-reviews") == 403
        # reviews' certificate replayed from productpage's address: principal and address disagree.
        assert await req("/ratings/0", PRODUCTPAGE, "bookinfo-reviews") == 403
    finally:
        await server.stop()
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)


def test_unknown_workload_gets_deny_all_and_is_logged(tmp_path: Path, upstream: int, pki: dict) -> None:  # noqa: F811
    asyncio.run(asyncio.wait_for(_unknown(tmp_path, upstream, pki), 120))


async def _unknown(tmp_path: Path, app_port: int, pki: dict) -> None:
    sock = tmp_path / "xds.sock"
    server = XdsServer(XdsSettings(unix_socket=sock, debounce_quiet=0.05, ack_timeout=20))
    await server.start()
    envoy = None
    try:
        publisher = IstioPublisher(server)
        # Leia is published under her pod name; a sidecar claiming another pod at her address is not her.
        publisher.publish("leia-7d4b9", "default", [ipaddress.ip_address(LEIA)], _config(POLICY))
        stranger = node_id("leia-fake", "default", ipaddress.ip_address(LEIA))
        envoy = await asyncio.to_thread(
            start_sidecar, sidecar_config("leia-fake", "default", LEIA, 80, app_port, pki["leia"], pki["ca"], sock)
        )
        await asyncio.wait_for(_acked(server, stranger), 30)
        status = await asyncio.to_thread(request, LEIA, 80, "/public", LUKE, pki["luke"], pki["ca"])
        assert status == 403
        with structlog.testing.capture_logs() as logs:
            assert publisher.check_nodes() == [stranger]
            assert publisher.check_nodes() == [stranger]
        assert [e["event"] for e in logs] == ["istio.unknown_workload"]  # logged once
        assert logs[0]["pod"] == "leia-fake" and logs[0]["config"] == "deny-all"
    finally:
        await server.stop()
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
