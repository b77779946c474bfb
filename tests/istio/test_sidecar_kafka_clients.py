"""Kafka through a meshed pod's sidecar, end to end: real Envoy, real broker, real client.

The agent core (in-memory datapath twin) runs Istio sidecar mode without the
node proxy, so `flagella.agent.istio` serves ECDS *and* the Kafka processor
on its own xDS server. A real Envoy stands for leia's sidecar (inbound TCP
chain on 9092, STRICT mTLS, ALPN ``istio``, the Kafka EnvoyFilter's filters)
in front of a Tansu broker; kafka-python connects over mTLS with a SPIFFE
client certificate as a peer's sidecar would. Checks: luke's allowed produce
passes, its Produce to a topic it may only consume (visible in Metadata, so
the client does send the Produce) gets TOPIC_AUTHORIZATION_FAILED, both
judged for luke's identity (named by its SPIFFE certificate); vader (no
rule) is closed; a policy update applies to the running sidecar.

The pods' addresses are loopback ones (the agent's pod CIDR is a 127.79.x.0/24
of this test's own), so the sidecar listens on leia's address and the peers'
SPIFFE-and-address principals hold: Kafka clients cannot pick a source address,
so each peer gets a plain byte relay (`KafkaRelay` without a processor: TLS
passes through it) that connects from the peer's address, and the processor
advertises that relay in Metadata answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kafka.errors import KafkaTimeoutError

from flagella.agent.settings import NetworkSettings
from flagella.istio.workload import IstioSettings, kafka_resource_names
from flagella.proxy.kafka import KafkaAccessRecord, KafkaSettings
from flagella.proxy.kafka_envoy import ChainKey, Peer
from tests.istio.sidecar_harness import kafka_sidecar_config, make_ca, make_leaf, start_sidecar
from tests.istio.test_agent_sidecars import Agent
from tests.istio.test_sidecar_kafka_envoy import _applied
from tests.support.kafka_broker import BrokerMissing, broker_with_topics
from tests.support.kafka_clients import produce
from tests.support.kafka_relay import KafkaRelay

CIDR = f"127.79.{os.getpid() % 250}.0/24"
PORT = 9092

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: leia-kafka, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: leia}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: luke}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules: {kafka: [{role: produce, topic: empire-announce}, {role: consume, topic: deathstar-plans}]}
"""


@pytest.fixture
def broker() -> Iterator[tuple[str, int]]:
    try:
        with broker_with_topics(["empire-announce", "deathstar-plans"]) as address:
            yield address
    except BrokerMissing as exc:
        pytest.fail(str(exc))


def _client_tls(cert: tuple[Path, Path], ca: Path) -> ssl.SSLContext:
    """What a peer's sidecar presents: its SPIFFE certificate, ALPN ``istio``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # Istio checks the SPIFFE SAN, not a host name
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert[0], cert[1])
    ctx.set_alpn_protocols(["istio"])
    return ctx


def test_sidecar_enforces_kafka_rules_for_the_spiffe_peer(tmp_path: Path, broker: tuple[str, int]) -> None:
    sock = tmp_path / "xds.sock"
    agent = Agent(tmp_path, istio=IstioSettings(enabled=True, socket_in_pod=str(sock)),
                  network=NetworkSettings(ipv4_cidr=CIDR))
    envoy = None
    stack = contextlib.ExitStack()
    try:
        assert agent.settings.xds_socket_path == str(sock)
        core = agent.core
        luke = core.create_endpoint("luke", labels={"app": "luke"}, service_account="luke")
        vader = core.create_endpoint("vader", labels={"app": "vader"}, service_account="vader")
        leia = core.create_endpoint("leia", labels={"app": "leia"}, service_account="leia", istio_sidecar=True)
        assert core.wait_for_revision(core.import_policies(list(yaml.safe_load_all(POLICY))), timeout=30) == []
        kafka = agent.istio.kafka
        leia_ip = str(leia.ipv4)
        relays = {
            ep.identity: stack.enter_context(
                KafkaRelay((leia_ip, PORT), ep.identity, None, kafka.codec, local_addr=str(ep.ipv4)))
            for ep in (luke, vader)
        }
        # The broker advertises itself; clients must come back through their relay.
        kafka.settings_for = lambda peer: KafkaSettings(advertised_broker=("127.0.0.1", relays[peer.identity].port))
        judged: list[tuple[Peer, KafkaAccessRecord]] = []
        kafka.on_peer_record = lambda peer, rec: judged.append((peer, rec))

        pki = tmp_path / "pki"
        pki.mkdir()
        ca = make_ca(pki)
        certs = {sa: make_leaf(pki, "default", sa) for sa in ("leia", "luke", "vader")}
        config = kafka_sidecar_config("leia", "default", leia_ip, PORT, broker[1], certs["leia"], ca, sock)
        envoy = start_sidecar(config)
        agent.run(asyncio.wait_for(_applied(envoy, kafka_resource_names(PORT)), 60))

        luke_tls = {"security_protocol": "SSL", "ssl_context": _client_tls(certs["luke"], ca)}
        ok = produce("kafka-python", relays[luke.identity].address, "empire-announce", b"allowed", **luke_tls)
        assert ok.ok, ok
        denied = produce("kafka-python", relays[luke.identity].address, "deathstar-plans", b"denied", **luke_tls)
        assert (denied.ok, denied.error) == (False, "TOPIC_AUTHORIZATION_FAILED")
        chain = ChainKey(leia.id, False, PORT)
        produced = [(p, r) for p, r in judged if r.api_key == 0]
        assert [(p, r.topics, r.verdict) for p, r in produced] == [
            (Peer(chain, luke.identity), ("empire-announce",), "forwarded"),
            (Peer(chain, luke.identity), ("deathstar-plans",), "denied"),
        ]

        # vader has no rule on the port: its connections are closed, nothing is produced.
        before = len(judged)
        vader_tls = {"security_protocol": "SSL", "ssl_context": _client_tls(certs["vader"], ca)}
        with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):  # every connection closed
            produce("kafka-python", relays[vader.identity].address, "empire-announce", b"vader",
                    max_block_ms=3000, **vader_tls)
        assert len(judged) == before
        assert any(f"identity {vader.identity} on {chain.name}" in c for c in kafka.closes)

        # A policy update reaches the running sidecar's processor: luke may now produce there too.
        wider = POLICY.replace("{role: consume, topic: deathstar-plans}", "{role: produce, topic: deathstar-plans}")
        assert wider != POLICY
        assert core.wait_for_revision(core.import_policies(list(yaml.safe_load_all(wider))), timeout=30) == []
        core.wait_idle()
        again = produce("kafka-python", relays[luke.identity].address, "deathstar-plans", b"now allowed", **luke_tls)
        assert again.ok, again
    finally:
        stack.close()
        if envoy is not None:
            envoy.stop()
        agent.close()

