"""The xDS enforcer's Kafka chains: built from resolved policy, ACKed by the real Envoy,
and the rules the agent's ext_proc service is fed.

Traffic through these chains needs the kernel redirect (TPROXY keeps the original
destination); that runs in tests/e2e/test_kafka_agent.py with the real agent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import os
from pathlib import Path

from flagella.endpoint.model import Endpoint
from flagella.policy.api import KafkaRule
from flagella.policy.l7 import KafkaRequest, l7_allows
from flagella.policy.mapstate import ANY_IDENTITY, Entry, Key, L7Policy, MapState, Verdict
from flagella.policy.resolver import EndpointPolicy
from flagella.proxy.enforcer import ProxyPorts, XdsEnforcer
from flagella.proxy.envoy import EnvoyProcess, bootstrap, free_port
from flagella.proxy.kafka_envoy import ChainKey, KafkaExtProcService
from flagella.proxy.kafka_node import identity_filter_name, identity_rbac
from flagella.proxy.rbac import peer_sets
from flagella.xds.server import XdsServer, XdsSettings
from flagella.xds.types import EXTENSION_CONFIG, LISTENER

_base_ids = itertools.count(44000 + os.getpid() % 1000 * 10)
TCP = 6
HQ, OUTPOST, HOST = 300, 301, 1
PRODUCE = L7Policy("kafka", kafka=frozenset({KafkaRule(api_keys=frozenset({0, 3}), topic="empire-announce")}))
CONSUME = L7Policy("kafka", kafka=frozenset({KafkaRule(api_keys=frozenset({1, 2, 3}), topic="empire-announce")}))


def kafka_policy(port: int, rules: dict[int, L7Policy]) -> EndpointPolicy:
    ingress = MapState(True)
    for ident, l7 in rules.items():
        ingress.add(Key(ident, TCP, port, port), Entry(Verdict.REDIRECT, l7))
    return EndpointPolicy(ingress, MapState(False))


def endpoint() -> Endpoint:
    return Endpoint(id=7, name="kafka-broker", namespace="default", labels={}, identity=500,
                    ipv4=ipaddress.IPv4Address("10.244.9.10"))


def test_rules_per_peer_follow_the_kernel_decision() -> None:
    """The processor gets exactly the rules MapState's decision gives each peer."""
    enforcer = XdsEnforcer(XdsServer(XdsSettings(unix_socket=Path("/nonexistent"))), None, dict,
                           legacy_host_allows_world=False)
    entry = enforcer._entry(endpoint(), kafka_policy(9092, {HQ: PRODUCE, OUTPOST: CONSUME}).ingress,
                            MapState(False), {})
    enforcer._entries[7] = entry
    chain = ChainKey(7, False, 9092)
    assert enforcer.kafka_rules(chain, HQ) == PRODUCE
    assert enforcer.kafka_rules(chain, OUTPOST) == CONSUME
    # The host's override (spec 3.3) comes from the resolved policy (allow_localhost
    # "always" gives it the wildcard there); the enforcer adds nothing of its own.
    assert enforcer.kafka_rules(chain, HOST) is None
    # A peer the kernel never redirects, another port, the other direction: no rules.
    assert enforcer.kafka_rules(chain, 999) is None
    assert enforcer.kafka_rules(ChainKey(7, False, 9093), HQ) is None
    assert enforcer.kafka_rules(ChainKey(7, True, 9092), HQ) is None
    # A wildcard-peer rule: every other peer gets it, specific peers keep theirs (merged).
    enforcer._entries[7] = enforcer._entry(
        endpoint(), kafka_policy(9092, {ANY_IDENTITY: CONSUME, HQ: PRODUCE}).ingress, MapState(False), {})
    assert enforcer.kafka_rules(chain, 999) == CONSUME
    assert enforcer.kafka_rules(chain, HQ) == PRODUCE.merge(CONSUME)


def test_identity_rbac_names_each_peer_by_address_and_direction() -> None:
    peers = peer_sets({ipaddress.ip_network("10.244.9.11/32"): HQ, ipaddress.ip_network("10.244.0.0/16"): 9})
    ingress = identity_rbac(ChainKey(7, False, 9092), peers)
    assert set(ingress.shadow_rules.policies) == {"identity-300", "identity-9", "identity-2"}
    assert ingress.shadow_rules_stat_prefix == "flagella_kafka_7_ingress_9092_"
    hq = ingress.shadow_rules.policies["identity-300"]
    assert hq.principals[0].direct_remote_ip.address_prefix == "10.244.9.11"
    # identity 9 owns its /16 minus hq's address (longest-prefix match).
    assert "not_id" in str(ingress.shadow_rules.policies["identity-9"].principals[0])
    egress = identity_rbac(ChainKey(7, True, 9092), peers)
    assert egress.shadow_rules.policies["identity-300"].permissions[0].destination_ip.address_prefix == "10.244.9.11"
    # The enforcing rules allow everything: L3/L4 is the kernel's.
    assert list(ingress.rules.policies) == ["allow-all"]


async def _wait_done(completion, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not completion.done and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


def test_envoy_acks_kafka_chains_and_open_connections_get_new_rules(tmp_path: Path) -> None:
    async def main() -> None:
        ipcache = {ipaddress.ip_network("10.244.9.11/32"): HQ}
        refreshed: list[int] = []
        enforcer: XdsEnforcer | None = None

        def rules(chain: ChainKey, ident: int) -> L7Policy | None:
            assert enforcer is not None
            return enforcer.kafka_rules(chain, ident)

        service = KafkaExtProcService(rules)
        server = XdsServer(XdsSettings(unix_socket=tmp_path / "xds.sock", debounce_quiet=0.01, debounce_max=0.1),
                           services=[service.register])
        await server.start()
        enforcer = XdsEnforcer(
            server, asyncio.get_running_loop(), lambda: peer_sets(ipcache),
            ProxyPorts(ingress=free_port(), egress=free_port()), envoy_wait_s=30, access_log=False,
            on_kafka_change=lambda: refreshed.append(1),
        )
        envoy = EnvoyProcess(bootstrap("node-k", tmp_path / "xds.sock", free_port()), next(_base_ids))
        try:
            await asyncio.to_thread(envoy.start)
            done = enforcer.apply(endpoint(), 1, kafka_policy(9092, {HQ: PRODUCE}))
            assert not done.done  # a Kafka redirect waits for Envoy's ACK, like HTTP
            await _wait_done(done)
            assert done.done and done.error is None, done.error
            assert refreshed
            status = {t.type_url: t for row in server.status() for t in row.types}
            assert status[LISTENER].version_acked == server.cache.view("node-k", LISTENER).version
            assert status[EXTENSION_CONFIG].version_acked == server.cache.view("node-k", EXTENSION_CONFIG).version
            dump = json.dumps(await asyncio.to_thread(envoy.config_dump))
            for needle in ("kafka/7/ingress/9092", "envoy.filters.network.ext_proc",
                           identity_filter_name(ChainKey(7, False, 9092)), "identity-300"):
                assert needle in dump, needle
            # A new peer: one ECDS update, no listener rebuilt (open Kafka connections stay).
            lds = await asyncio.to_thread(envoy.stats, "listener_manager.lds.update_success")
            ipcache[ipaddress.ip_network("10.244.9.12/32")] = OUTPOST
            enforcer.refresh_peers()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if "identity-301" in json.dumps(await asyncio.to_thread(envoy.config_dump)):
                    break
            assert "identity-301" in json.dumps(await asyncio.to_thread(envoy.config_dump))
            assert await asyncio.to_thread(envoy.stats, "listener_manager.lds.update_success") == lds
            # Removed: the listener goes (no chains left).
            enforcer.remove(endpoint())
            await asyncio.sleep(0.5)
            assert enforcer.kafka_rules(ChainKey(7, False, 9092), HQ) is None
        finally:
            await asyncio.to_thread(envoy.stop)
            await server.stop()

    asyncio.run(main())


def test_monitor_line_names_both_identities_api_and_topics() -> None:
    from flagella.agent.proxy import kafka_event
    from flagella.proxy.kafka import KafkaAccessRecord
    from flagella.proxy.kafka_envoy import Peer

    rec = KafkaAccessRecord(OUTPOST, 0, 7, 3, "rdkafka", ("empire-announce",), "denied")
    ev = kafka_event(Peer(ChainKey(7, False, 9092), OUTPOST), rec, 500)
    assert (ev["type"], ev["proxy_type"], ev["src_identity"], ev["dst_identity"]) == ("l7", "kafka", OUTPOST, 500)
    assert ev["line"] == ("<- endpoint 7 ingress Request kafka port 9092, identity 301->500, verdict Denied "
                          "apiKey 0 (Produce) apiVersion 7 correlationID 3 clientID rdkafka topic empire-announce")
    # Egress: the endpoint is the client; a Metadata answer's refused topics are shown.
    meta = KafkaAccessRecord(HQ, 3, 9, 4, None, ("a",), "forwarded", refused_topics=("b",))
    line = kafka_event(Peer(ChainKey(8, True, 9092), HQ), meta, 600)["line"]
    assert line.startswith("-> endpoint 8 egress Request kafka port 9092, identity 600->300, verdict Forwarded "
                           "apiKey 3 (Metadata) apiVersion 9")
    assert line.endswith("clientID - topic a (refused: b)")


def test_egress_rules_and_the_local_brokers_ingress_rules() -> None:
    """A client's egress chain to a broker on this node judges by both sides' rules: Envoy's
    upstream is not redirected again, so the broker's ingress chain never sees it."""
    enforcer = XdsEnforcer(XdsServer(XdsSettings(unix_socket=Path("/nonexistent"))), None, dict,
                           legacy_host_allows_world=False)
    broker = endpoint()  # identity 500
    client = Endpoint(id=8, name="hq", namespace="default", labels={}, identity=HQ,
                      ipv4=ipaddress.IPv4Address("10.244.9.11"))
    both_topics = L7Policy("kafka", kafka=frozenset({
        KafkaRule(api_keys=frozenset({0, 3}), topic="empire-announce"),
        KafkaRule(api_keys=frozenset({0, 3}), topic="deathstar-plans"),
    }))
    egress = MapState(False)
    egress.add(Key(broker.identity, TCP, 9092, 9092), Entry(Verdict.REDIRECT, both_topics))
    egress.add(Key(600, TCP, 9092, 9092), Entry(Verdict.REDIRECT, both_topics))  # a broker elsewhere
    enforcer._entries[8] = enforcer._entry(client, MapState(True), egress, {})
    out = ChainKey(8, True, 9092)
    # No local broker with ingress rules yet: the egress rules alone.
    assert enforcer.kafka_rules(out, broker.identity) == both_topics
    enforcer._entries[7] = enforcer._entry(broker, kafka_policy(9092, {HQ: PRODUCE}).ingress, MapState(False), {})
    rules = enforcer.kafka_rules(out, broker.identity)
    assert rules is not None
    produce = KafkaRequest(api_key=0, api_version=3, topics=("empire-announce",))
    plans = KafkaRequest(api_key=0, api_version=3, topics=("deathstar-plans",))
    fetch = KafkaRequest(api_key=1, api_version=4, topics=("empire-announce",))
    assert l7_allows(rules, produce)
    assert not l7_allows(rules, plans)  # egress allows it, the broker's ingress does not
    assert not l7_allows(rules, fetch)  # neither allows it
    # Another destination identity is judged by the egress rules alone.
    assert enforcer.kafka_rules(out, 600) == both_topics
    # The broker's ingress does not redirect the client at all (the kernel decides): no AND.
    enforcer._entries[7] = enforcer._entry(broker, kafka_policy(9092, {OUTPOST: CONSUME}).ingress, MapState(False), {})
    assert enforcer.kafka_rules(out, broker.identity) == both_topics
    # The ingress chain itself is unchanged: its own rules only.
    enforcer._entries[7] = enforcer._entry(broker, kafka_policy(9092, {HQ: PRODUCE}).ingress, MapState(False), {})
    assert enforcer.kafka_rules(ChainKey(7, False, 9092), HQ) == PRODUCE
