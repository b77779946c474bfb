"""The Kafka guide (spec 10(b)) through the real agent: its node proxy's Kafka chains.

One `flagella agent` (proxy on: the kernel redirects the broker's Kafka port to the
agent's Envoy, whose chain asks the agent's ext_proc service), five pods in network
namespaces, a real Tansu broker in the broker pod, and real clients (kafka-python and
confluent-kafka, ``assign()``, no consumer group) running in the client pods. The
policy is the guide's ``secure-empire-kafka`` (conformance case kafka-02, step 2).
``flagella monitor --type l7`` runs throughout; its Kafka lines and
``flagella_policy_l7_total{proxy_type="kafka"}`` are checked too.

The pods live in a namespace and a /24 of this process (pid based), so the run does
not collide with the conformance runner's pods.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import e2e_harness as h
from tests.support.cases import load_cases
from tests.support.e2e_plan import Peer, PodPlan
from tests.support.host import FLAGELLA
from tests.support.kafka_broker import NetnsBroker
from tests.support.kafka_clients import CLIENTS

pytestmark = pytest.mark.root

NS = f"kg{os.getpid() % 100000}"
NET = f"10.244.{240 + os.getpid() % 10}"
TOPICS = ("empire-announce", "deathstar-plans")
PODS = {
    "kafka-broker": ({"app": "kafka", "zgroup": "kafkaTestApp"}, 10),
    "empire-hq": ({"app": "empire-hq", "zgroup": "kafkaTestApp"}, 11),
    "empire-outpost-8888": ({"app": "empire-outpost", "outpostid": "8888", "zgroup": "kafkaTestApp"}, 12),
    "empire-outpost-9999": ({"app": "empire-outpost", "outpostid": "9999", "zgroup": "kafkaTestApp"}, 13),
    "empire-backup": ({"app": "empire-backup", "zgroup": "kafkaTestApp"}, 14),
}
BROKER, HQ, O8888, O9999, BACKUP = (f"{NS}/{name}" for name in PODS)


def guide_policy() -> dict[str, Any]:
    case = next(c for c in load_cases() if c.id == "kafka-02-docs-role-based")
    [doc] = next(s for s in case.steps if s.number == 2).policies
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = NS
    return doc


class Monitor:
    """``flagella monitor --type l7`` as a user runs it, its lines collected."""

    def __init__(self, socket: str) -> None:
        self.proc = subprocess.Popen([FLAGELLA, "monitor", "--type", "l7", "--socket", socket],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[h.Cluster, Monitor, str]]:
    h.prepare_host()
    h.sweep_stale()
    workdir = tmp_path_factory.mktemp("kafka-agent-")
    logs = workdir / "logs"
    logs.mkdir()
    metrics = f"127.0.0.1:{h._free_port()}"
    agent = h.Agent(workdir, "k", metrics_addr=metrics)
    cluster: h.Cluster | None = None
    monitor: Monitor | None = None
    try:
        agent.start()
        cluster = h.Cluster(agent, None, logs, 4, "k")
        for name, (labels, host) in PODS.items():
            cluster._create(PodPlan(f"{NS}/{name}", NS, name, labels, "default", f"{NET}.{host}", None,
                                    frozenset(), ()))
        doc = guide_policy()
        revision = agent.call("policy.import", {"documents": [doc], "sources": ["kafka guide"]})["revision"]
        assert agent.call("policy.wait", {"revision": revision, "timeout": 60})["lagging"] == []
        monitor = Monitor(agent.socket)
        yield cluster, monitor, metrics
    finally:
        if monitor is not None:
            monitor.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()
        agent.stop()
        if cluster is not None:
            h.remove_pod_leftovers(cluster.netns_seen)
            cluster.marker.unlink(missing_ok=True)
        print(f"\nkafka guide logs: {logs} (agent log {agent.log_path})")


def kafka(cluster: h.Cluster, pod: str, op: str, topic: str, client: str, **extra: Any) -> dict[str, Any]:
    live = cluster.pods[pod]
    req = {"kind": "kafka", "addr": f"{NET}.10", "port": 9092, "timeout": 3.0, "op": op, "topic": topic,
           "client": client, **extra}
    return cluster.prober_for(Peer("pod", pod, live.plan.ipv4)).request(req, timeout=90)


@contextlib.contextmanager
def broker(cluster: h.Cluster) -> Iterator[None]:
    live = cluster.pods[BROKER]
    b = NetnsBroker(live.netns, live.plan.ipv4, 9092, TOPICS, seed=b"seed", python=h.PYTHON)
    b.start()
    try:
        yield
    finally:
        b.stop()


def metric(addr: str, rule: str, proxy_type: str) -> float:
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    m = re.search(rf'^flagella_policy_l7_total{{(?=[^}}]*rule="{rule}")(?=[^}}]*proxy_type="{proxy_type}")[^}}]*}} (\S+)$',
                  text, re.M)
    assert m is not None, f"no flagella_policy_l7_total rule={rule} proxy_type={proxy_type}"
    return float(m[1])


@pytest.mark.parametrize("client", CLIENTS)
def test_kafka_guide_through_the_agent(guide: tuple[h.Cluster, Monitor, str], client: str) -> None:
    cluster, monitor, metrics = guide
    denied_before = metric(metrics, "denied", "kafka")
    with broker(cluster):
        announce, plans = f"Empire Day via {client}", f"deathstar reactor design v3 via {client}"
        # empire-hq produces to both topics.
        for topic, value in (("empire-announce", announce), ("deathstar-plans", plans)):
            got = kafka(cluster, HQ, "produce", topic, client, value=value)
            assert (got["result"], got["kafka_error"]) == ("open", ""), got
        # The outposts consume empire-announce, the backup deathstar-plans.
        for pod in (O8888, O9999):
            got = kafka(cluster, pod, "consume", "empire-announce", client, want=2)
            assert (got["kafka_error"], got["values"]) == ("", ["seed", announce]), got
        got = kafka(cluster, BACKUP, "consume", "deathstar-plans", client, want=2)
        assert (got["kafka_error"], got["values"]) == ("", ["seed", plans]), got

        # outpost-9999 produces a fake announcement: TopicAuthorizationException.
        fake = kafka(cluster, O9999, "produce", "empire-announce", client,
                     value="Vader Booed at Empire Karaoke Party")
        assert (fake["result"], fake["kafka_error"]) == ("open", "TOPIC_AUTHORIZATION_FAILED"), fake
        # ... and fetches deathstar-plans: TOPIC_AUTHORIZATION_FAILED, nothing read.
        stolen = kafka(cluster, O9999, "consume", "deathstar-plans", client, want=1, op_timeout=6)
        assert (stolen["kafka_error"], stolen["values"]) == ("TOPIC_AUTHORIZATION_FAILED", []), stolen
        # On a raw connection (no Metadata first): the Fetch is answered 29 and the pipelined
        # ApiVersions after it still gets its answer: the connection stays open.
        raw = kafka(cluster, O9999, "fetch-raw", "deathstar-plans", client)
        assert (raw["kafka_error"], raw["values"]) == ("TOPIC_AUTHORIZATION_FAILED", []), raw
        # The fake never reached the broker.
        seen = kafka(cluster, O8888, "consume", "empire-announce", client, want=3, op_timeout=4)
        assert seen["values"] == ["seed", announce], seen

    # The monitor shows the denials with both identities; the metric counts them.
    eps = {f"{e['namespace']}/{e['name']}": e for e in cluster.agent.call("endpoint.list", {})}
    o9999, kafka_id = eps[O9999]["identity"], eps[BROKER]["identity"]
    deadline = time.monotonic() + 5
    want = re.compile(rf"<- endpoint {eps[BROKER]['id']} ingress Request kafka port 9092, identity "
                      rf"{o9999}->{kafka_id}, verdict Denied apiKey 0 \(Produce\) apiVersion \d+ .*topic empire-announce")
    while not any(want.search(line) for line in monitor.lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(want.search(line) for line in monitor.lines), "\n".join(monitor.lines[-20:])
    assert any("verdict Forwarded apiKey 1 (Fetch)" in line for line in monitor.lines)
    assert metric(metrics, "denied", "kafka") >= denied_before + 2
    assert metric(metrics, "forwarded", "kafka") > 0

