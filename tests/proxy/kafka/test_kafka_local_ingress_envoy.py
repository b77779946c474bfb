"""Egress Kafka rules AND the local broker's ingress rules, through REAL Envoy.

On one node, a client's egress chain carries its request to the broker pod and
Envoy's upstream is not redirected again, so `XdsEnforcer.kafka_rules` gives the
egress chain both decisions. Here the enforcer holds the client's egress chain
(produce to both topics) and, once added, the broker's ingress rules for that
client (produce empire-announce, consume deathstar-plans); a real Envoy runs the
Kafka chain named as the client's egress chain, the processor asks the enforcer,
and kafka-python produces through it to Tansu.

Stand-in: without the kernel's TPROXY the chain's peer cannot come from the
original destination, so Envoy's shadow RBAC names the broker's identity by the
client relay's source address (on the node the egress chain names the
destination, which is the broker). What is real: Envoy, the processor, the
enforcer's lookup, the broker, the client. The kernel path is
tests/e2e/test_kafka_agent.py.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from flagella.endpoint.model import Endpoint
from flagella.policy.api import KAFKA_ROLES, KafkaRule
from flagella.policy.mapstate import Entry, Key, L7Policy, MapState, Verdict
from flagella.proxy.enforcer import XdsEnforcer
from flagella.proxy.kafka_envoy import ChainKey
from flagella.xds.server import XdsServer, XdsSettings
from tests.proxy.kafka.test_kafka_e2e import CODEC, tansu_broker
from tests.support.kafka_clients import produce
from tests.support.kafka_envoy import Pod, kafka_envoy

TCP, PORT = 6, 9092
CLIENT_ID, BROKER_ID = 8, 7
CLIENT_IDENTITY, BROKER_IDENTITY = 300, 500


def _rules(*pairs: tuple[str, str]) -> L7Policy:
    return L7Policy("kafka", kafka=frozenset(
        KafkaRule(api_keys=frozenset(KAFKA_ROLES[role]), topic=topic) for role, topic in pairs
    ))


def _endpoint(ep_id: int, identity: int, address: str) -> Endpoint:
    return Endpoint(id=ep_id, name=f"ep{ep_id}", namespace="default", labels={}, identity=identity,
                    ipv4=ipaddress.IPv4Address(address))


def test_local_brokers_ingress_rules_apply_on_the_egress_chain() -> None:
    enforcer = XdsEnforcer(XdsServer(XdsSettings(unix_socket=Path("/nonexistent"))), None, dict)
    egress = MapState(False)
    egress.add(Key(BROKER_IDENTITY, TCP, PORT, PORT), Entry(Verdict.REDIRECT, _rules(
        ("produce", "empire-announce"), ("produce", "deathstar-plans"))))
    enforcer._entries[CLIENT_ID] = enforcer._entry(
        _endpoint(CLIENT_ID, CLIENT_IDENTITY, "10.244.9.11"), MapState(True), egress, {})
    ingress = MapState(True)
    ingress.add(Key(CLIENT_IDENTITY, TCP, PORT, PORT), Entry(Verdict.REDIRECT, _rules(
        ("produce", "empire-announce"), ("consume", "deathstar-plans"))))
    broker_entry = enforcer._entry(_endpoint(BROKER_ID, BROKER_IDENTITY, "10.244.9.10"), ingress, MapState(False), {})

    # The chain's peer is the destination: the broker's identity.
    pods = {"client": Pod(BROKER_IDENTITY, L7Policy("kafka"), "127.0.0.21")}
    with tansu_broker() as broker, kafka_envoy(
        broker, pods, CODEC, chain=ChainKey(CLIENT_ID, True, PORT), rules=enforcer.kafka_rules,
    ) as env:
        address = env.addresses["client"]
        # The broker pod is not local (no entry): the egress rules alone decide.
        assert produce("kafka-python", address, "deathstar-plans", b"egress only").ok
        # The broker pod is local with ingress rules on the port: both decide. deathstar-plans
        # stays visible in Metadata (both may consume it), so the client sends the Produce,
        # and the processor answers it TOPIC_AUTHORIZATION_FAILED.
        enforcer._entries[BROKER_ID] = broker_entry
        assert produce("kafka-python", address, "empire-announce", b"both allow").ok
        denied = produce("kafka-python", address, "deathstar-plans", b"ingress denies")
        assert (denied.ok, denied.error) == (False, "TOPIC_AUTHORIZATION_FAILED")
        produced = [(r.topics, r.verdict) for r in env.records if r.api_key == 0]
        assert produced == [
            (("deathstar-plans",), "forwarded"),
            (("empire-announce",), "forwarded"),
            (("deathstar-plans",), "denied"),
        ]
