"""The real agent judges Kafka in a real Envoy shaped as leia's Istio sidecar, over mTLS.

``flagella agent`` runs with ``istio: {enabled: true}`` (and its node proxy, as by
default: the sidecars' Kafka chains then call the node proxy's Kafka service, which
asks the sidecar enforcer). leia is meshed; a Tansu broker runs in leia's pod on its
loopback, advertising leia's address and port 9092, where the sidecar of
`tests.istio.sidecar_harness` listens (Istio's inbound TCP chain, STRICT mTLS, ALPN
``istio``, then the two filters of ``manifests/istio/envoyfilter-kafka.yaml``, their
configs from the agent over ECDS). kafka-python runs in luke's pod with luke's
SPIFFE certificate: its produce to empire-announce passes, its produce to
deathstar-plans (which luke may only consume, so Metadata shows it and the client
sends the Produce) gets TOPIC_AUTHORIZATION_FAILED. yoda has no rule on the port and
is dropped in BPF before the sidecar.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flagella.proxy.envoy import EnvoyProcess, free_port
from tests.istio.sidecar_harness import kafka_sidecar_config, make_ca, make_leaf, start_sidecar
from tests.support.kafka_broker import tansu_binary
from tests.system._support import Agent, Cluster, in_netns, namespace, tcp_connect, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]
TAG = "ik"
PORT = 9092
REPO = Path(__file__).resolve().parents[2]

CLIENT = r"""
import json, ssl, sys
from tests.support.kafka_clients import produce
cert, key, ca, address, topic = sys.argv[1:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["istio"])
try:
    out = produce("kafka-python", address, topic, b"v", security_protocol="SSL", ssl_context=ctx)
    print(json.dumps({"ok": out.ok, "error": out.error}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__}))
"""


def _policy(ns: str) -> dict[str, Any]:
    sa = "io.cilium.k8s.policy.serviceaccount"
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "sys-istio-kafka-leia", "namespace": ns},
        "spec": {
            "endpointSelector": {"matchLabels": {sa: "leia"}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {sa: "luke"}}],
                "toPorts": [{"ports": [{"port": str(PORT), "protocol": "TCP"}], "rules": {"kafka": [
                    {"role": "produce", "topic": "empire-announce"},
                    {"role": "consume", "topic": "deathstar-plans"},
                ]}}],
            }],
        },
    }


@pytest.fixture
def agent(system_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    workdir = tmp_path_factory.mktemp(f"agent-{TAG}")
    # The sidecar runs on this machine: the socket "in the pod" is the agent's own.
    socket = workdir / "state" / "xds.sock"
    a = Agent(workdir, TAG, extra_settings=f"istio: {{enabled: true, socket_in_pod: {socket}}}\n")
    try:
        a.start()
        yield a
    finally:
        a.close()


@pytest.fixture
def sidecars() -> Iterator[list[EnvoyProcess]]:
    started: list[EnvoyProcess] = []
    yield started
    for envoy in started:
        envoy.stop()


def test_agent_judges_kafka_in_the_sidecar_over_mtls(
    agent: Agent, make_cluster: Callable[[Agent], Cluster], sidecars: list[EnvoyProcess], tmp_path: Path,
) -> None:
    c = make_cluster(agent)
    ns = namespace(TAG)
    leia = c.create("leia", ns, 80, {"app": "leia"}, istio_sidecar=True, service_account="leia")
    luke = c.create("luke", ns, 81, {"app": "luke"}, service_account="luke")
    yoda = c.create("yoda", ns, 82, {"app": "yoda"}, service_account="yoda")
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki)
    certs = {sa: make_leaf(pki, ns, sa) for sa in ("leia", "luke")}

    # The broker in leia's pod, on its loopback; clients reach it through the sidecar.
    tansu = str(tansu_binary())
    bport = free_port()
    local = f"tcp://127.0.0.1:{bport}"
    c.spawn(leia.netns, tansu, "broker", "--listener-url", local,
            "--advertised-listener-url", f"tcp://{leia.ipv4}:{PORT}",
            "--storage-engine", "memory://tansu/", "--cluster-id", f"flagella-{TAG}",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def create_topics() -> bool:
        return all(subprocess.run(
            ["ip", "netns", "exec", leia.netns, tansu, "topic", "create", topic, "--partitions", "1",
             "--broker", local], capture_output=True, timeout=30).returncode == 0
            for topic in ("empire-announce", "deathstar-plans"))

    wait_until(create_topics, timeout=30, what="tansu in leia's pod")
    c.import_policy(_policy(ns))

    config = kafka_sidecar_config(
        "leia", ns, leia.ipv4, PORT, bport, certs["leia"], ca, Path(agent.state_dir) / "xds.sock"
    )
    with in_netns(leia.netns):  # Envoy (and its admin port) in leia's pod
        sidecars.append(start_sidecar(config))

    def produce(topic: str) -> dict[str, Any]:
        cert, key = certs["luke"]
        p = subprocess.run(
            ["ip", "netns", "exec", luke.netns, sys.executable, "-c", CLIENT, str(cert), str(key), str(ca),
             f"{leia.ipv4}:{PORT}", topic],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
        return out

    wait_until(lambda: produce("empire-announce")["ok"], timeout=90, what="the sidecar to judge luke's produce")
    assert produce("deathstar-plans") == {"ok": False, "error": "TOPIC_AUTHORIZATION_FAILED"}
    assert produce("empire-announce") == {"ok": True, "error": ""}
    assert tcp_connect(yoda.netns, leia.ipv4, PORT) == "timeout"  # no rule: dropped in BPF
