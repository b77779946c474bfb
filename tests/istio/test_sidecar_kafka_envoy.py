"""The Kafka part of sidecar mode in a real Envoy: network RBAC + network ext_proc over ECDS.

A real Envoy stands for leia's sidecar with an inbound TCP chain on 9092
(STRICT mTLS, ALPN ``istio``) that runs the two filters of
``manifests/istio/envoyfilter-kafka.yaml`` before Istio's ``tcp_proxy``. Their
configs are `workload_kafka`'s, published by `IstioPublisher` on a real
`XdsServer`, which also serves the Kafka processor (`KafkaExtProcService`)
on the same socket, as the agent does. What is checked: the sidecar ACKs
both resources; a connection reaches the processor with the chain of
leia's port and the peer identity its SPIFFE certificate *and* address
name; a stolen certificate is world; before the first config, the
default config closes the connection (fail closed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from pathlib import Path

from flagella.istio.publisher import IstioPublisher
from flagella.istio.workload import (
    IstioSettings,
    kafka_resource_names,
    node_id,
    workload_kafka,
    workload_rbac,
)
from flagella.policy.api import load_policies
from flagella.policy.engine import PolicyEngine
from flagella.policy.labels import k8s_labels
from flagella.policy.mapstate import L7Policy
from flagella.policy.resolver import EndpointInfo, PolicySettings
from flagella.proxy.envoy import EnvoyProcess
from flagella.proxy.kafka_envoy import ChainKey, KafkaExtProcService
from flagella.proxy.rbac import peer_sets
from flagella.xds.server import XdsServer, XdsSettings
from flagella.xds.types import EXTENSION_CONFIG
from tests.istio.sidecar_harness import (
    kafka_sidecar_config,
    make_ca,
    make_leaf,
    start_sidecar,
    tls_connection,
)

NET = f"127.78.{os.getpid() % 250}"
LEIA, LUKE, VADER = f"{NET}.1", f"{NET}.2", f"{NET}.3"
POD = "leia-kafka"
NODE = node_id(POD, "default", ipaddress.ip_address(LEIA))
PORT = 9092
WORLD = 2

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: leia-kafka, namespace: default}
spec:
  endpointSelector: {matchLabels: {io.cilium.k8s.policy.serviceaccount: leia}}
  ingress:
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.serviceaccount: luke}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules: {kafka: [{role: consume, topic: deathstar-plans}]}
"""

# ApiVersions v0, correlation id 7, client id "t".
API_VERSIONS = struct.pack(">hhih", 18, 0, 7, 1) + b"t"
FRAME = struct.pack(">i", len(API_VERSIONS)) + API_VERSIONS


async def _applied(envoy: EnvoyProcess, names: tuple[str, ...]) -> None:
    """Until Envoy reloaded each network filter's config from ECDS."""
    while True:
        stats = await asyncio.to_thread(envoy.stats, "extension_config_discovery.network_filter")
        if all(stats.get(f"extension_config_discovery.network_filter.{n}.config_reload", 0) >= 1 for n in names):
            return
        await asyncio.sleep(0.1)


def test_kafka_filters_over_ecds_name_the_peer(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_scenario(tmp_path), 120))


async def _scenario(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki)
    certs = {sa: make_leaf(pki, "default", sa) for sa in ("leia", "luke", "vader")}
    engine = PolicyEngine(PolicySettings())
    engine.upsert_policies(load_policies(POLICY))
    identities = {
        256: k8s_labels({"app": "leia"}, "default", service_account="leia"),
        300: k8s_labels({"app": "luke"}, "default", service_account="luke"),
        301: k8s_labels({"app": "vader"}, "default", service_account="vader"),
    }
    for ident, labels in identities.items():
        engine.set_identity(ident, labels)
    engine.upsert_endpoint(EndpointInfo(1, 256, identities[256], addresses=frozenset({ipaddress.ip_address(LEIA)})))
    peers = peer_sets({ipaddress.ip_network(f"{ip}/32"): i for i, ip in ((300, LUKE), (301, VADER), (256, LEIA))})

    sock = tmp_path / "xds.sock"
    asked: list[tuple[ChainKey, int]] = []

    def rules(chain: ChainKey, identity: int) -> L7Policy | None:
        asked.append((chain, identity))
        return None  # the processor closes: the test only needs who was asked about

    service = KafkaExtProcService(rules)
    server = XdsServer(XdsSettings(unix_socket=sock, debounce_quiet=0.05, ack_timeout=20), services=[service.register])
    app = socket.create_server(("127.0.0.1", 0))
    config = kafka_sidecar_config(POD, "default", LEIA, PORT, app.getsockname()[1], certs["leia"], ca, sock)
    envoy = await asyncio.to_thread(start_sidecar, config)

    def exchange(source: str, cert: str) -> bytes:
        """Send one Kafka frame over mTLS; what comes back before the sidecar closes."""
        try:
            conn = tls_connection(LEIA, PORT, source, certs[cert], ca)
        except OSError:
            return b"<closed in handshake>"
        try:
            conn.sendall(FRAME)
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            return data
        except OSError:
            return b"<reset>"
        finally:
            conn.close()

    try:
        # Fail closed: no agent yet; the RBAC default config (no policy) closes the connection.
        assert await asyncio.to_thread(exchange, LUKE, "luke") in (b"", b"<reset>", b"<closed in handshake>")
        assert asked == []

        await server.start()
        publisher = IstioPublisher(server)
        ingress = engine.policy(1).ingress
        settings = IstioSettings()
        kafka = workload_kafka(1, ingress, peers, identities, settings, str(sock))
        assert set(kafka) == set(kafka_resource_names(PORT))
        publisher.publish(POD, "default", [ipaddress.ip_address(LEIA)], workload_rbac(ingress, peers, identities, settings),
                          kafka)
        # One ECDS subscription (and stream) per filter: wait until Envoy applied both.
        await asyncio.wait_for(_applied(envoy, kafka_resource_names(PORT)), 60)
        for row in server.status():
            assert row.node == NODE
            for t in row.types:
                assert t.type_url == EXTENSION_CONFIG and t.phase == "acked", t

        assert await asyncio.to_thread(exchange, LUKE, "luke") in (b"", b"<reset>")  # rules: None closes
        assert asked[-1] == (ChainKey(1, False, PORT), 300)  # luke: SPIFFE id and address
        assert await asyncio.to_thread(exchange, VADER, "vader") in (b"", b"<reset>")
        assert asked[-1] == (ChainKey(1, False, PORT), 301)
        # luke's certificate from vader's pod matches nobody: world.
        await asyncio.to_thread(exchange, VADER, "luke")
        assert asked[-1] == (ChainKey(1, False, PORT), WORLD)
        assert len(asked) == 3
    finally:
        await server.stop()
        await asyncio.to_thread(envoy.stop)
        app.close()
