"""The Kafka guide and the conformance corpus's Kafka probes, end to end.

Real clients (kafka-python and confluent-kafka/librdkafka) talk to the real
Tansu broker through `tests.support.kafka_relay`, an asyncio relay that runs the
sans-IO processor (the stand-in for Envoy's network ext_proc until that path
exists). Each client pod gets its own relay, holding the identity and the L7
policy that the real policy engine (`Tracer`) computes for that pod towards the
broker from the case's CiliumNetworkPolicy.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

import pytest

from flagella.policy.api import Protocol, parse_policy
from flagella.policy.mapstate import L7Policy, Verdict
from flagella.policy.trace import TraceQuery, Tracer
from flagella.proxy.kafka import KafkaCodec, TopicIds
from tests.support.cases import load_cases
from tests.support.kafka_broker import BrokerMissing, broker_with_topics
from tests.support.kafka_clients import CLIENTS, consume, list_topics, produce, read_frame
from tests.support.kafka_relay import KafkaRelay
from tests.support.trace_probe import side

TOPICS = ("empire-announce", "deathstar-plans")
CODEC = KafkaCodec()
CASES = {c.id: c for c in load_cases()}
WILDCARD = L7Policy("kafka", wildcard=True)


@contextlib.contextmanager
def tansu_broker() -> Iterator[tuple[str, int]]:
    try:
        with broker_with_topics(TOPICS) as address:
            yield address
    except BrokerMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def broker() -> Iterator[tuple[str, int]]:
    with tansu_broker() as address:
        yield address


def pod_policy(case_id: str, step_number: int, pod: str) -> tuple[int, L7Policy]:
    """The identity of ``pod`` and the L7 policy the broker holds it to on 9092/TCP."""
    case = CASES[case_id]
    step = next(s for s in case.steps if s.number == step_number)
    tracer = Tracer([parse_policy(doc) for doc in step.policies])
    broker_pod = "default/kafka-broker"
    result = tracer.trace(TraceQuery(
        src=side(case, pod, step), dst=side(case, broker_pod, step), dport=(9092, Protocol.TCP),
    ))
    decision = result.ingress.decision
    assert result.allowed, f"{pod} may not reach the broker at L3/L4"
    if decision is None or decision.verdict != Verdict.REDIRECT:
        return result.src_identity, WILDCARD
    assert decision.l7 is not None
    return result.src_identity, decision.l7


@contextlib.contextmanager
def relays(broker: tuple[str, int], case_id: str, step: int, pods: list[str]) -> Iterator[dict[str, KafkaRelay]]:
    topic_ids = TopicIds()
    with contextlib.ExitStack() as stack:
        out = {}
        for pod in pods:
            identity, policy = pod_policy(case_id, step, pod)
            out[pod] = stack.enter_context(KafkaRelay(broker, identity, policy, CODEC, topic_ids))
        yield out


HQ, O8888, O9999, BACKUP = (
    "default/empire-hq", "default/empire-outpost-8888", "default/empire-outpost-9999",
    "default/empire-backup",
)


@pytest.mark.parametrize("client", CLIENTS)
def test_kafka_guide(client: str) -> None:
    """Spec 10(b): the guide's policy, with a fresh broker per client library."""
    with tansu_broker() as broker, relays(broker, "kafka-02-docs-role-based", 2,
                                          [HQ, O8888, O9999, BACKUP]) as relay:
        announce = f"Empire Day is on {client}".encode()
        plans = f"deathstar reactor design v3 via {client}".encode()
        assert produce(client, relay[HQ].address, "empire-announce", announce).ok
        assert produce(client, relay[HQ].address, "deathstar-plans", plans).ok

        for outpost in (O8888, O9999):
            got = consume(client, relay[outpost].address, "empire-announce", 1)
            assert got.ok and got.values == [announce], got
        got = consume(client, relay[BACKUP].address, "deathstar-plans", 1)
        assert got.ok and got.values == [plans], got

        fake = produce(client, relay[O9999].address, "empire-announce",
                       b"Vader Booed at Empire Karaoke Party")
        assert (fake.ok, fake.error) == (False, "TOPIC_AUTHORIZATION_FAILED")
        stolen = consume(client, relay[O9999].address, "deathstar-plans", 1, timeout=6)
        assert (stolen.ok, stolen.error, stolen.values) == (False, "TOPIC_AUTHORIZATION_FAILED", [])

        # Asking for every topic shows each pod only the topics its rules name.
        assert list_topics(client, relay[O8888].address) == {"empire-announce"}
        assert list_topics(client, relay[BACKUP].address) == {"deathstar-plans"}
        assert list_topics(client, relay[HQ].address) == set(TOPICS)

        # The fake announcement never reached the broker: hq's own consumer view is clean.
        seen = consume(client, relay[O8888].address, "empire-announce", 2, timeout=4)
        assert seen.values == [announce]
        # Nothing was closed: denials are Kafka answers, not dropped connections.
        assert all(not r.log.closes for r in relay.values())
        denied = [r for r in relay[O9999].log.records if r.verdict == "denied"]
        assert any(r.api_key == 0 and r.topics == ("empire-announce",) for r in denied)
        assert any("deathstar-plans" in r.refused_topics for r in relay[O9999].log.records)


def _send(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(frame)


def _read_frame(sock: socket.socket) -> bytes:
    return read_frame(sock)


def test_denied_fetch_is_answered_in_order_and_the_connection_stays_open(broker) -> None:
    """An attacker in outpost-9999 skips Metadata and fetches deathstar-plans on a raw socket."""
    assert produce("kafka-python", f"{broker[0]}:{broker[1]}", "deathstar-plans", b"secret").ok
    with relays(broker, "kafka-02-docs-role-based", 2, [O9999]) as relay, \
            socket.create_connection(("127.0.0.1", relay[O9999].port), 5) as sock:
        fetch = {"MaxWaitMs": 10, "MinBytes": 1, "MaxBytes": 1 << 20, "Topics": [
            {"Topic": "deathstar-plans", "Partitions": [
                {"Partition": 0, "FetchOffset": 0, "PartitionMaxBytes": 1 << 20}]}]}
        # Pipelined: a denied Fetch, then an allowed ApiVersions, then an allowed Fetch.
        _send(sock, CODEC.encode_request(1, 4, 41, "attacker", fetch)
              + CODEC.encode_request(18, 2, 42, "attacker", {})
              + CODEC.encode_request(1, 4, 43, "attacker", fetch | {"Topics": [
                  fetch["Topics"][0] | {"Topic": "empire-announce"}]}))
        corr, denied = CODEC.decode_response(1, 4, _read_frame(sock))
        assert corr == 41
        [topic] = denied["Responses"]
        assert topic["Topic"] == "deathstar-plans"
        assert [p["ErrorCode"] for p in topic["Partitions"]] == [29]
        assert all(p["Records"] in (None, b"") for p in topic["Partitions"])
        corr, versions = CODEC.decode_response(18, 2, _read_frame(sock))
        assert (corr, versions["ErrorCode"]) == (42, 0)
        corr, allowed = CODEC.decode_response(1, 4, _read_frame(sock))
        assert corr == 43
        assert allowed["Responses"][0]["Partitions"][0]["ErrorCode"] == 0
        assert relay[O9999].log.closes == []


def test_garbage_closes_the_connection(broker) -> None:
    with relays(broker, "kafka-02-docs-role-based", 2, [O9999]) as relay, \
            socket.create_connection(("127.0.0.1", relay[O9999].port), 5) as sock:
        sock.sendall(struct.pack(">i", 12) + b"\x00\x00\x00\x00garbagegarb")
        sock.settimeout(5)
        assert sock.recv(100) == b""
        [reason] = relay[O9999].log.closes
        assert reason.startswith("unparsable request")


def _conformance_probes():  # type: ignore[no-untyped-def]
    for case_id in ("kafka-01-k8s-kafka-policy-test", "kafka-02-docs-role-based"):
        case = CASES[case_id]
        for step in case.steps:
            for probe in step.probes:
                if probe.kafka:
                    yield pytest.param(case_id, step.number, probe,
                                       id=f"{case_id}-s{step.number}-{probe.label}")


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(("case_id", "step", "probe"), list(_conformance_probes()))
def test_conformance_kafka_probe(broker, client, case_id, step, probe) -> None:  # type: ignore[no-untyped-def]
    """Each Kafka probe as the real client operation it names (produce, or consume by fetch)."""
    kafka = probe.kafka
    topic = str(kafka["topic"])
    operation = str(kafka.get("role") or kafka.get("apiKey")).lower()
    with relays(broker, case_id, step, [probe.src]) as relay:
        address = relay[probe.src].address
        if operation == "produce":
            outcome = produce(client, address, topic, b"probe")
        else:
            assert operation in ("consume", "fetch")
            assert produce(client, f"{broker[0]}:{broker[1]}", topic, b"seed").ok
            outcome = consume(client, address, topic, 1, timeout=6)
        got = "allow" if outcome.ok else "deny"
        assert got == probe.expect, outcome
        log = relay[probe.src].log
        if not outcome.ok:
            assert outcome.values == []
            # The client either surfaced the refusal, or (kafka-python, refused ListOffsets)
            # kept retrying; either way the processor refused a request naming the topic.
            assert outcome.error in ("TOPIC_AUTHORIZATION_FAILED", "timeout"), outcome
            assert any(
                (r.verdict == "denied" and topic in r.topics) or topic in r.refused_topics
                for r in log.records
            )
        else:
            assert all(r.verdict == "forwarded" for r in log.records if topic in r.topics)
        assert log.closes == []
