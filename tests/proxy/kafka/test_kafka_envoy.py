"""The Kafka guide through REAL Envoy: network RBAC (identity) -> network ext_proc
(`flagella.proxy.kafka_envoy.KafkaExtProcService`) -> tcp_proxy,
against the real Tansu broker, with real kafka-python and confluent-kafka clients.

Each pod connects from its own loopback address; Envoy's shadow RBAC rules name
its identity, which the service reads from the forwarded metadata, and the
service holds it to the rules the policy engine computes from the guide's
CiliumNetworkPolicy (`pod_policy`).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

import pytest

from tests.proxy.kafka.test_kafka_e2e import (
    BACKUP,
    CODEC,
    HQ,
    O8888,
    O9999,
    TOPICS,
    _read_frame,
    pod_policy,
    tansu_broker,
)
from tests.support.kafka_clients import CLIENTS, consume, produce
from tests.support.kafka_envoy import KafkaEnvoy, Pod, kafka_envoy

IDENTITY = {HQ: 1001, O8888: 1002, O9999: 1003, BACKUP: 1004}
SOURCES = {HQ: "127.0.0.11", O8888: "127.0.0.12", O9999: "127.0.0.13", BACKUP: "127.0.0.14"}


@contextlib.contextmanager
def guide(broker: tuple[str, int]) -> Iterator[KafkaEnvoy]:
    # Each trace numbers identities afresh: the pods get distinct ones here, their rules
    # come from the engine.
    pods = {pod: Pod(IDENTITY[pod], pod_policy("kafka-02-docs-role-based", 2, pod)[1], source)
            for pod, source in SOURCES.items()}
    with kafka_envoy(broker, pods, CODEC) as env:
        yield env


@pytest.mark.parametrize("client", CLIENTS)
def test_kafka_guide_through_envoy(client: str) -> None:
    with tansu_broker() as broker, guide(broker) as env:
        at = env.addresses
        announce = f"Empire Day is on {client}".encode()
        plans = f"deathstar reactor design v3 via {client}".encode()
        assert produce(client, at[HQ], "empire-announce", announce).ok
        assert produce(client, at[HQ], "deathstar-plans", plans).ok
        for outpost in (O8888, O9999):
            got = consume(client, at[outpost], "empire-announce", 1)
            assert got.ok and got.values == [announce], got
        got = consume(client, at[BACKUP], "deathstar-plans", 1)
        assert got.ok and got.values == [plans], got

        fake = produce(client, at[O9999], "empire-announce", b"Vader Booed at Empire Karaoke Party")
        assert (fake.ok, fake.error) == (False, "TOPIC_AUTHORIZATION_FAILED")
        stolen = consume(client, at[O9999], "deathstar-plans", 1, timeout=6)
        assert (stolen.ok, stolen.error, stolen.values) == (False, "TOPIC_AUTHORIZATION_FAILED", [])
        seen = consume(client, at[O8888], "empire-announce", 2, timeout=4)
        assert seen.values == [announce]

        assert env.service.closes == []
        o9999 = IDENTITY[O9999]
        denied = [r for r in env.records if r.verdict == "denied"]
        assert any(r.identity == o9999 and r.api_key == 0 and r.topics == ("empire-announce",) for r in denied)
        # Envoy's own view: the shadow rules named the peers.
        stats = env.envoy.stats("flagella_kafka")
        assert any(k.endswith("shadow_allowed") and v > 0 for k, v in stats.items()), stats


def _connect(env: KafkaEnvoy, pod: str) -> socket.socket:
    host, port = env.addresses[pod].rsplit(":", 1)
    return socket.create_connection((host, int(port)), 5)


def test_denial_in_order_and_garbage_close_through_envoy() -> None:
    """An attacker in outpost-9999 on raw sockets: a denied Fetch is answered in order and the
    connection serves on; a garbage frame closes its connection and nothing else."""
    with tansu_broker() as broker, guide(broker) as env:
        assert produce("kafka-python", f"{broker[0]}:{broker[1]}", "deathstar-plans", b"secret").ok
        fetch = {"MaxWaitMs": 10, "MinBytes": 1, "MaxBytes": 1 << 20, "Topics": [
            {"Topic": "deathstar-plans", "Partitions": [
                {"Partition": 0, "FetchOffset": 0, "PartitionMaxBytes": 1 << 20}]}]}
        with _connect(env, O9999) as sock:
            sock.sendall(CODEC.encode_request(1, 4, 41, "attacker", fetch)
                         + CODEC.encode_request(18, 2, 42, "attacker", {}))
            corr, denied = CODEC.decode_response(1, 4, _read_frame(sock))
            assert corr == 41
            assert [p["ErrorCode"] for p in denied["Responses"][0]["Partitions"]] == [29]
            corr, versions = CODEC.decode_response(18, 2, _read_frame(sock))
            assert (corr, versions["ErrorCode"]) == (42, 0)
            # Still open after the denial: the next allowed request is served.
            sock.sendall(CODEC.encode_request(18, 2, 43, "attacker", {}))
            assert CODEC.decode_response(18, 2, _read_frame(sock))[0] == 43

            with _connect(env, O9999) as bad:
                bad.sendall(struct.pack(">i", 12) + b"\x00\x00\x00\x00garbagegarb")
                bad.settimeout(5)
                assert bad.recv(100) == b""
            assert any(r.startswith("unparsable request") for r in env.service.closes)
            # The agent's service and the other connection are unharmed.
            sock.sendall(CODEC.encode_request(18, 2, 44, "attacker", {}))
            assert CODEC.decode_response(18, 2, _read_frame(sock))[0] == 44
        assert produce("kafka-python", env.addresses[HQ], TOPICS[0], b"after").ok
