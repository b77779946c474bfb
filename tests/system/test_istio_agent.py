"""The real agent feeds a real Envoy, shaped as leia's Istio sidecar in leia's pod, over ECDS.

``flagella agent`` runs with ``istio: {enabled: true}`` (no node proxy): its own xDS
server on its socket serves each meshed pod's sidecar. The sidecar is the Envoy of
`tests.istio.sidecar_harness` (Istio's inbound listener, STRICT mTLS with SPIFFE
certificates this test makes, Istio's authz filter, then Flagella's filter exactly as
``manifests/istio/envoyfilter.yaml`` inserts it), started inside leia's network
namespace on leia's pod address, port 80, in front of an HTTP app on the pod's
loopback. Peers send requests from their own pods over mTLS.

The release notes' service-account example: ``luke`` may ``GET /public`` on ``leia``
port 80; ``vader`` reaches the port (a rule of its own) but only for ``GET /vader``;
``yoda`` has no rule and is dropped in BPF. Then, in order:

* fail closed: the agent is down when the sidecar starts: its default config denies;
* a sidecar in a pod that is not meshed gets deny-all, and the agent logs it;
* the agent comes back: the sidecar fetches leia's config from it (and the endpoint is
  ready: the sidecar's ACK completed the regeneration);
* a policy update applies without restarting the sidecar;
* an agent outage leaves the last config in force.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flagella.istio.workload import node_id
from flagella.proxy.envoy import EnvoyProcess, free_port
from tests.istio.sidecar_harness import make_ca, make_leaf, request, sidecar_config, start_sidecar
from tests.system._support import Agent, Cluster, Pod, in_netns, namespace, tcp_connect, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]
TAG = "ia"

APP = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"app {self.path}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
s.serve_forever()
"""


def _policy(ns: str, luke_paths: list[str]) -> dict[str, Any]:
    sa = "io.cilium.k8s.policy.serviceaccount"
    http = lambda *paths: {"http": [{"method": "GET", "path": p} for p in paths]}  # noqa: E731
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "sys-istio-agent-leia", "namespace": ns},
        "spec": {
            "endpointSelector": {"matchLabels": {sa: "leia"}},
            "ingress": [
                {"fromEndpoints": [{"matchLabels": {sa: "luke"}}],
                 "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": http(*luke_paths)}]},
                {"fromEndpoints": [{"matchLabels": {sa: "vader"}}],
                 "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": http("/vader")}]},
            ],
        },
    }


@pytest.fixture
def agent(system_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp(f"agent-{TAG}"), TAG, extra_settings="istio: {enabled: true}\n")
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


def test_agent_feeds_the_sidecar_over_mtls(
    agent: Agent, make_cluster: Callable[[Agent], Cluster], sidecars: list[EnvoyProcess], tmp_path: Path,
) -> None:
    c = make_cluster(agent)
    ns = namespace(TAG)
    leia = c.create("leia", ns, 70, {"app": "leia"}, istio_sidecar=True, service_account="leia")
    luke = c.create("luke", ns, 71, {"app": "luke"}, service_account="luke")
    vader = c.create("vader", ns, 72, {"app": "vader"}, service_account="vader")
    yoda = c.create("yoda", ns, 73, {"app": "yoda"}, service_account="yoda")
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki)
    certs = {sa: make_leaf(pki, ns, sa) for sa in ("leia", "luke", "vader", "yoda")}
    app_port = free_port()
    app = c.spawn(leia.netns, sys.executable, "-c", APP, str(app_port), stdout=subprocess.PIPE, text=True)
    assert app.stdout is not None and app.stdout.readline().strip() == "ready"
    c.import_policy(_policy(ns, ["/public"]))

    def req(src: Pod, path: str, cert: str | None = None, method: str = "GET") -> int | str:
        with in_netns(src.netns):
            try:
                return request(leia.ipv4, 80, path, src.ipv4, certs[cert or src.name], ca, method)
            except OSError as exc:
                return f"{type(exc).__name__}"

    # Fail closed: the sidecar starts while the agent is down; the default config denies.
    agent.stop()
    config = sidecar_config(
        "leia", ns, leia.ipv4, 80, app_port, certs["leia"], ca, Path(agent.state_dir) / "xds.sock"
    )
    with in_netns(leia.netns):  # Envoy (and its admin port) in leia's pod
        sidecars.append(start_sidecar(config))
    envoy = sidecars[0]
    pid = envoy.proc.pid if envoy.proc else 0
    assert req(luke, "/public") == 403
    assert req(vader, "/vader") == 403

    # The agent comes back: the sidecar gets leia's config; the endpoint is ready.
    agent.start()
    wait_until(lambda: req(luke, "/public") == 200, timeout=90, what="the sidecar to fetch leia's config")
    node = node_id("leia", ns, ipaddress.ip_address(leia.ipv4))
    rows = {r["node"]: r for r in agent.call("proxy.status")}
    assert node in rows, rows
    assert agent.call("endpoint.get", {"name": leia.key})["state"] == "ready"

    def checks(luke_health: int) -> None:
        assert req(luke, "/public") == 200
        assert req(luke, "/private") == 403
        assert req(luke, "/public?x=1") == 403  # full match on :path
        assert req(luke, "/public", method="POST") == 403
        assert req(luke, "/health") == luke_health
        assert req(vader, "/vader") == 200  # another service account: its own rule only
        assert req(vader, "/public") == 403
        # Stolen certificates: luke's from vader's pod, vader's from luke's pod.
        assert req(vader, "/public", cert="luke") == 403
        assert req(luke, "/vader", cert="vader") == 403
        # No rule at all: dropped in BPF before the sidecar (L3/L4 stays in the kernel).
        assert tcp_connect(yoda.netns, leia.ipv4, 80) == "timeout"

    checks(luke_health=403)

    # A sidecar in a pod the agent does not know as meshed (vader has no flag): deny-all, logged.
    stranger = sidecar_config(
        "vader", ns, vader.ipv4, 80, app_port, certs["vader"], ca, Path(agent.state_dir) / "xds.sock"
    )
    with in_netns(vader.netns):
        sidecars.append(start_sidecar(stranger))
    wait_until(lambda: agent.log_events("istio.unknown_workload"), timeout=30, what="the unknown sidecar's log line")
    (event,) = agent.log_events("istio.unknown_workload")
    assert event["pod"] == "vader" and event["config"] == "deny-all"
    with in_netns(luke.netns):
        assert request(vader.ipv4, 80, "/public", luke.ipv4, certs["luke"], ca) == 403

    # A policy update applies without restarting the sidecar.
    c.import_policy(_policy(ns, ["/public", "/health"]))
    wait_until(lambda: req(luke, "/health") == 200, timeout=30, what="the update to reach the sidecar")
    checks(luke_health=200)
    assert envoy.running and envoy.proc is not None and envoy.proc.pid == pid

    # Agent outage: the last config stays in force.
    agent.stop()
    time.sleep(1.0)
    checks(luke_health=200)
    assert envoy.running
    agent.start()  # so that the cluster's teardown goes through the agent
    with contextlib.suppress(AssertionError):
        wait_until(lambda: any(r["node"] == node for r in agent.call("proxy.status")), timeout=30, what="resync")
