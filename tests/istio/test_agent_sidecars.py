"""The agent core with Istio sidecar mode: what its xDS server holds for each sidecar.

The agent core runs over the in-memory datapath twin and its own real
`XdsServer` (on a loop in a thread, as in the agent); the sidecar's view is
read from the server's cache under the node id a stock sidecar sends. A real
Envoy fetching it over mTLS is tests/system/test_istio_agent.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.ext_proc.v3 import ext_proc_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2

from flagella.agent.core import AgentCore
from flagella.agent.istio import IstioSidecars
from flagella.agent.settings import AgentSettings, load_settings
from flagella.datapath.port import MemoryDatapath
from flagella.endpoint import State
from flagella.errors import InputError
from flagella.istio.workload import FILTER_NAME, IstioSettings, kafka_resource_names, node_id
from flagella.policy.l7 import KafkaRequest, l7_allows
from flagella.policy.mapstate import L7Policy, Verdict
from flagella.proxy.kafka import KafkaConnection
from flagella.proxy.kafka_envoy import ChainKey, Peer
from flagella.xds.types import EXTENSION_CONFIG

POLICY = yaml.safe_load("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: leia, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: leia}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: luke}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}]}
  - fromEndpoints: [{matchLabels: {app: luke}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules: {kafka: [{role: consume, topic: deathstar-plans}]}
""")


class Agent:
    def __init__(self, tmp_path: Path, start: bool = True, istio: IstioSettings | None = None, **settings: Any) -> None:
        self.settings = AgentSettings(state_dir=str(tmp_path), istio=istio or IstioSettings(enabled=True), **settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.istio = IstioSidecars(self.settings)
        self.dp = MemoryDatapath()
        self.core = AgentCore(self.settings, self.dp, with_kernel=[self.istio.enforcer])
        self.core.ipcache_listeners.append(lambda d: self.istio.set_ipcache(d, self.core.engine.identities()))
        if start:
            self.run(self.istio.start())
        self.core.restore()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def view(self, node: str) -> dict[str, extension_pb2.TypedExtensionConfig]:
        async def read() -> dict[str, extension_pb2.TypedExtensionConfig]:
            view = self.istio.server.cache.view(node, EXTENSION_CONFIG)
            return {n: extension_pb2.TypedExtensionConfig.FromString(r.value) for n, r in view.resources.items()}

        return dict(self.run(read()))

    def close(self) -> None:
        self.core.close()
        self.run(self.istio.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    try:
        yield a
    finally:
        a.close()


def _http(resource: extension_pb2.TypedExtensionConfig) -> http_rbac_pb2.RBAC:
    config = http_rbac_pb2.RBAC()
    assert resource.typed_config.Unpack(config)
    return config


def _node(ep: Any) -> str:
    return node_id(ep.name, ep.namespace, ep.ipv4)


def test_meshed_endpoint_gets_its_workload_config_and_others_deny_all(agent: Agent) -> None:
    core = agent.core
    luke = core.create_endpoint("luke", labels={"app": "luke"}, service_account="luke")
    leia = core.create_endpoint("leia", labels={"app": "leia"}, service_account="leia", istio_sidecar=True)
    plain = core.create_endpoint("leia-plain", labels={"app": "leia"}, service_account="leia")
    assert core.wait_for_revision(core.import_policies([POLICY]), timeout=30) == []
    assert leia.state == State.READY

    view = agent.view(_node(leia))
    config = str(_http(view[FILTER_NAME]))
    assert "spiffe://cluster.local/ns/default/sa/luke" in config and "/public" in config
    assert f'address_prefix: "{luke.ipv4}"' in config  # SPIFFE id AND luke's address
    assert "destination_port: 80" in config
    # The node id of the IPv6 address gets the same resources.
    assert agent.view(node_id("leia", "default", leia.ipv6)) == view

    # Kafka: network RBAC naming luke by SPIFFE id, and ext_proc to the socket in the pod.
    rbac_name, ext_proc_name = kafka_resource_names(9092)
    net = net_rbac_pb2.RBAC()
    assert view[rbac_name].typed_config.Unpack(net)
    assert net.stat_prefix == f"flagella_kafka_{leia.id}_ingress_9092_"
    assert "spiffe://cluster.local/ns/default/sa/luke" in str(net.shadow_rules.policies[f"identity-{luke.identity}"])
    ext = ext_proc_pb2.NetworkExternalProcessor()
    assert view[ext_proc_name].typed_config.Unpack(ext)
    assert ext.grpc_service.google_grpc.target_uri == "unix:/var/run/flagella/xds.sock"
    assert not ext.failure_mode_allow

    # The kernel: no node-proxy redirect for the meshed pod (the sidecar sees the plaintext).
    kernel = {(k.identity, k.port): Verdict(v.verdict) for k, v in agent.dp.policy.items()
              if k.ep_id == leia.id and not k.egress and k.identity == luke.identity}
    assert kernel == {(luke.identity, 80): Verdict.ALLOW, (luke.identity, 9092): Verdict.ALLOW}
    assert set(agent.view(_node(leia))) == {FILTER_NAME, rbac_name, ext_proc_name}

    # Not meshed, unknown, a claimed but wrong pod name: the deny-all base config only.
    deny_all = {FILTER_NAME}
    for node in (_node(plain), _node(luke), node_id("leia-fake", "default", leia.ipv4), "not-a-sidecar"):
        v = agent.view(node)
        assert set(v) == deny_all and _http(v[FILTER_NAME]).rules.policies == {}, node

    # The node proxy replacing the global ECDS set on the same server keeps the base.
    agent.run(_set_global(agent))
    assert set(agent.view(_node(plain))) == {FILTER_NAME, "node-proxy-filter"}
    assert _http(agent.view(_node(plain))[FILTER_NAME]).rules.policies == {}


async def _set_global(agent: Agent) -> None:
    agent.istio.server.set_resources(
        EXTENSION_CONFIG, {"node-proxy-filter": extension_pb2.TypedExtensionConfig(name="node-proxy-filter")}
    )


def test_peer_policy_and_flag_changes_republish(agent: Agent) -> None:
    core = agent.core
    leia = core.create_endpoint("leia", labels={"app": "leia"}, service_account="leia", istio_sidecar=True)
    core.import_policies([POLICY])
    core.wait_idle()
    assert "spiffe://" not in str(_http(agent.view(_node(leia))[FILTER_NAME]))  # no luke yet
    luke = core.create_endpoint("luke", labels={"app": "luke"}, service_account="luke")
    core.wait_idle()
    assert "sa/luke" in str(_http(agent.view(_node(leia))[FILTER_NAME]))
    # luke relabelled out of the selector: its identity leaves leia's config.
    core.set_endpoint_labels("luke", {"app": "han"}, ())
    core.wait_idle()
    assert "sa/luke" not in str(_http(agent.view(_node(leia))[FILTER_NAME]))
    core.set_endpoint_labels("luke", {"app": "luke"}, ())
    core.wait_idle()
    # A policy update: GET /health too.
    updated = yaml.safe_load(yaml.safe_dump(POLICY).replace("path: /public", "path: /health"))
    core.import_policies([updated])
    core.wait_idle()
    config = str(_http(agent.view(_node(leia))[FILTER_NAME]))
    assert "/health" in config and "/public" not in config and str(luke.ipv4) in config
    # Deleting the pod puts its node ids back to deny-all.
    core.delete_endpoint("leia")
    core.wait_idle()
    assert _http(agent.view(_node(leia))[FILTER_NAME]).rules.policies == {}


def test_configs_of_a_restore_are_in_the_cache_before_the_server_serves(tmp_path: Path) -> None:
    """The agent's restore regenerates before the xDS server runs: those completions do not
    wait (no sidecar can be connected), and the configs are in the cache when `start`
    returns, before the server accepts the first stream."""
    a = Agent(tmp_path, start=False)
    try:
        core = a.core
        core.create_endpoint("luke", labels={"app": "luke"}, service_account="luke")
        leia = core.create_endpoint("leia", labels={"app": "leia"}, service_account="leia", istio_sidecar=True)
        assert core.wait_for_revision(core.import_policies([POLICY]), timeout=30) == []
        assert leia.state == State.READY
        assert not a.istio.server.cache.view(_node(leia), EXTENSION_CONFIG).resources  # nothing yet

        async def start_and_look() -> str:
            await a.istio.start()
            return str(_http(extension_pb2.TypedExtensionConfig.FromString(
                a.istio.server.cache.view(_node(leia), EXTENSION_CONFIG).resources[FILTER_NAME].value)))

        assert "sa/luke" in a.run(start_and_look())
    finally:
        a.close()


def test_init_policy_is_imported_once_from_settings(agent: Agent) -> None:
    r1 = agent.istio.ensure_init_policy(agent.core)
    assert r1 is not None
    assert agent.istio.ensure_init_policy(agent.core) is None  # the same document: nothing changes
    (policy,) = [p for k, p in agent.core.engine.policies.items() if k[2] == "istio-sidecar"]
    assert policy.source["spec"]["endpointSelector"] == {"matchLabels": {"reserved:init": ""}}


def test_istio_settings_from_file(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("istio: {enabled: true, trust_domain: mesh.example, init_policy: {dns_ports: [53, 5353]}}\n")
    s = load_settings(f)
    assert s.istio.enabled and s.istio.trust_domain == "mesh.example"
    assert tuple(s.istio.init_policy.dns_ports) == (53, 5353)
    f.write_text("istio: {init_policy: {dns_ports: [0]}}\n")
    with pytest.raises(InputError, match="istio.init_policy.dns_ports"):
        load_settings(f)
    f.write_text("istio: {init_policy: {dns_ports: [dns]}}\n")
    with pytest.raises(InputError, match="istio.init_policy.dns_ports: expected a list of numbers"):
        load_settings(f)
    f.write_text("istio: {trust_domain: a/b}\n")
    with pytest.raises(InputError, match="istio.trust_domain"):
        load_settings(f)
    assert not load_settings(None).istio.enabled


def test_kafka_service_on_the_own_server_serves_the_sidecar_chains(agent: Agent) -> None:
    """No node proxy: the istio module's own server carries the Kafka service, whose rules
    for a sidecar chain are the workload's ingress rules for that peer, kept current."""
    core = agent.core
    luke = core.create_endpoint("luke", labels={"app": "luke"}, service_account="luke")
    vader = core.create_endpoint("vader", labels={"app": "vader"}, service_account="vader")
    leia = core.create_endpoint("leia", labels={"app": "leia"}, service_account="leia", istio_sidecar=True)
    assert core.wait_for_revision(core.import_policies([POLICY]), timeout=30) == []
    chain = ChainKey(leia.id, False, 9092)
    kafka = agent.istio.kafka

    async def rules(c: ChainKey, identity: int) -> L7Policy | None:
        return kafka.rules(c, identity)

    consume = agent.run(rules(chain, luke.identity))
    assert consume is not None and not consume.wildcard
    assert l7_allows(consume, KafkaRequest(1, 4, topics=("deathstar-plans",)))
    assert not l7_allows(consume, KafkaRequest(0, 3, topics=("deathstar-plans",)))
    assert agent.run(rules(chain, vader.identity)) is None  # not redirected: closed
    assert agent.run(rules(ChainKey(leia.id, True, 9092), luke.identity)) is None
    assert agent.run(rules(ChainKey(luke.id, False, 9092), luke.identity)) is None  # not meshed
    assert agent.run(rules(chain, 1)) == L7Policy("kafka", wildcard=True)  # the host, as for HTTP

    # A policy change reaches the open connections (the service's refresh) from the next request.
    conn = KafkaConnection(luke.identity, consume, codec=kafka.codec)

    async def track() -> None:
        kafka._live[conn] = Peer(chain, luke.identity)

    agent.run(track())
    updated = yaml.safe_load(yaml.safe_dump(POLICY).replace("role: consume", "role: produce"))
    assert core.wait_for_revision(core.import_policies([updated]), timeout=30) == []
    core.wait_idle()
    agent.run(rules(chain, luke.identity))  # the publications on the loop ran before this
    assert l7_allows(conn.policy, KafkaRequest(0, 3, topics=("deathstar-plans",)))
    assert not l7_allows(conn.policy, KafkaRequest(1, 4, topics=("deathstar-plans",)))
    # The pod leaves the mesh: no sidecar rules any more, open connections are denied everything.
    core.delete_endpoint("leia")
    core.wait_idle()
    assert agent.run(rules(chain, luke.identity)) is None  # (after the removal, on the loop)
    assert conn.policy == L7Policy("kafka")


def test_with_the_node_proxy_its_kafka_service_serves_the_sidecar_chains(tmp_path: Path) -> None:
    """The agent's wiring with the node proxy on: one server, one Kafka service, which asks
    the sidecar enforcer for the chains the node proxy's enforcer has not."""
    from flagella.agent.proxy import NodeProxy

    settings = AgentSettings(state_dir=str(tmp_path), istio=IstioSettings(enabled=True))
    proxy = NodeProxy(settings)
    istio = IstioSidecars.for_agent(settings, proxy)
    assert istio.server is proxy.server and istio.kafka is proxy.kafka and not istio.own_server
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    async def bind() -> None:
        proxy.enforcer.bind(asyncio.get_running_loop())
        await istio.start()

    async def on_loop(fn: Any, *args: Any) -> Any:
        return fn(*args)

    run(bind())
    core = AgentCore(settings, MemoryDatapath(), enforcers=[proxy.enforcer], with_kernel=[istio.enforcer])
    try:
        core.restore()
        luke = core.create_endpoint("luke", labels={"app": "luke"}, service_account="luke")
        leia = core.create_endpoint("leia", labels={"app": "leia"}, service_account="leia", istio_sidecar=True)
        assert core.wait_for_revision(core.import_policies([POLICY]), timeout=30) == []
        chain = ChainKey(leia.id, False, 9092)
        assert run(on_loop(proxy.enforcer.kafka_rules, chain, luke.identity)) is None  # no node chain
        rules = run(on_loop(proxy.kafka.rules, chain, luke.identity))
        assert rules is not None and l7_allows(rules, KafkaRequest(1, 4, topics=("deathstar-plans",)))
        assert not l7_allows(rules, KafkaRequest(0, 3, topics=("deathstar-plans",)))
        # Monitor lines of the sidecar chain name leia as the local endpoint.
        assert run(on_loop(proxy._endpoint_identity, leia.id)) == leia.identity
    finally:
        core.close()
        run(istio.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
