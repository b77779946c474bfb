"""Real Kafka clients (kafka-python and confluent-kafka/librdkafka) doing one operation each.

Each operation returns an `Outcome`: ``ok`` with what was consumed, or the Kafka
error the client surfaced (its name, e.g. ``TOPIC_AUTHORIZATION_FAILED``).
Consumers use ``assign()`` (no consumer group) and read from the beginning.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

CLIENTS = ("kafka-python", "confluent-kafka")


@dataclass
class Outcome:
    ok: bool
    error: str = ""
    values: list[bytes] = field(default_factory=list)


def produce(client: str, address: str, topic: str, value: bytes, **config: Any) -> Outcome:
    """``config``: more client settings (kafka-python keywords, e.g. an ``ssl_context``)."""
    if client == "kafka-python":
        from kafka.errors import KafkaError

        from kafka import KafkaProducer

        producer = KafkaProducer(**{
            "bootstrap_servers": address, "acks": 1, "retries": 0, "max_block_ms": 10000,
            "request_timeout_ms": 10000, **config,
        })
        try:
            producer.send(topic, value).get(timeout=15)
            return Outcome(True)
        except KafkaError as exc:
            return Outcome(False, _kafka_python_error(exc))
        finally:
            producer.close(timeout=5)
    from confluent_kafka import Producer

    errors: list[str] = []
    producer = Producer({
        "bootstrap.servers": address, "acks": 1, "message.timeout.ms": 10000,
        "topic.metadata.refresh.interval.ms": 1000, "retries": 0, **config,
    })
    producer.produce(topic, value, on_delivery=lambda err, msg: errors.append(
        err.name() if err is not None else ""
    ))
    remaining = producer.flush(20)
    if remaining or not errors:
        return Outcome(False, "timeout")
    return Outcome(not errors[0], errors[0])


def _kafka_python_error(exc: Exception) -> str:
    from kafka.errors import TopicAuthorizationFailedError

    if isinstance(exc, TopicAuthorizationFailedError):
        return "TOPIC_AUTHORIZATION_FAILED"
    return type(exc).__name__


def consume(client: str, address: str, topic: str, want: int, timeout: float = 15) -> Outcome:
    """Read partition 0 of ``topic`` from the start until ``want`` values or an error."""
    deadline = time.monotonic() + timeout
    values: list[bytes] = []
    if client == "kafka-python":
        from kafka.errors import KafkaError

        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=address, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", request_timeout_ms=10000,
        )
        try:
            consumer.assign([TopicPartition(topic, 0)])
            while len(values) < want and time.monotonic() < deadline:
                batches = consumer.poll(timeout_ms=500)
                values.extend(r.value for recs in batches.values() for r in recs)
            if len(values) < want and topic in consumer._client.cluster.unauthorized_topics:
                # kafka-python keeps retrying the metadata of a topic it may not see,
                # and records why on its cluster view.
                return Outcome(False, "TOPIC_AUTHORIZATION_FAILED", values)
        except KafkaError as exc:
            return Outcome(False, _kafka_python_error(exc), values)
        finally:
            consumer.close()
        return Outcome(len(values) >= want, "" if len(values) >= want else "timeout", values)
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": address, "group.id": "flagella-test",
        "enable.auto.commit": False, "auto.offset.reset": "earliest",
    })
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        while len(values) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                return Outcome(False, msg.error().name(), values)
            values.append(msg.value())
        if len(values) < want:
            # librdkafka keeps a topic it may not see out of the fetch loop and says why
            # in the topic's metadata.
            error = _confluent_topic_error(consumer, topic)
            if error:
                return Outcome(False, error, values)
    finally:
        consumer.close()
    return Outcome(len(values) >= want, "" if len(values) >= want else "timeout", values)


def _confluent_topic_error(consumer: Any, topic: str) -> str:
    """The topic's Metadata error name as librdkafka holds it ("" if none); a busy client
    may miss one Metadata round trip, so ask up to three times."""
    from confluent_kafka import KafkaException

    for _ in range(3):
        try:
            error = consumer.list_topics(topic, timeout=5).topics[topic].error
        except KafkaException:
            continue
        return "" if error is None else str(error.name())
    return ""


def list_topics(client: str, address: str) -> set[str]:
    """The topics a client is shown when it asks the broker for all of them."""
    if client == "kafka-python":
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(bootstrap_servers=address, group_id=None)
        try:
            return set(consumer.topics())
        finally:
            consumer.close()
    from confluent_kafka.admin import AdminClient

    return set(AdminClient({"bootstrap.servers": address}).list_topics(timeout=10).topics)


def raw_fetch(host: str, port: int, topic: str, timeout: float = 10) -> Outcome:
    """An attacker skipping Metadata: a Fetch of ``topic`` pipelined with an ApiVersions on one
    raw connection. ``ok`` when the records came back; else the Fetch's error name, and
    ``"connection closed"`` when the connection did not stay open for the ApiVersions answer."""
    from flagella.proxy.kafka import KafkaCodec

    codec = KafkaCodec()
    fetch = {"MaxWaitMs": 10, "MinBytes": 1, "MaxBytes": 1 << 20, "Topics": [
        {"Topic": topic, "Partitions": [{"Partition": 0, "FetchOffset": 0, "PartitionMaxBytes": 1 << 20}]}]}

    with socket.create_connection((host, port), timeout) as sock:
        sock.sendall(codec.encode_request(1, 4, 41, "attacker", fetch)
                     + codec.encode_request(18, 2, 42, "attacker", {}))
        try:
            _, answer = codec.decode_response(1, 4, read_frame(sock))
            corr, versions = codec.decode_response(18, 2, read_frame(sock))
        except (ConnectionError, OSError):
            return Outcome(False, "connection closed")
    codes = [p["ErrorCode"] for t in answer["Responses"] for p in t["Partitions"]]
    records = [p["Records"] for t in answer["Responses"] for p in t["Partitions"] if p["Records"]]
    if corr != 42 or versions["ErrorCode"] != 0:
        return Outcome(False, f"ApiVersions answer {corr}/{versions['ErrorCode']}")
    if codes and all(c == 29 for c in codes):
        return Outcome(False, "TOPIC_AUTHORIZATION_FAILED")
    return Outcome(not any(codes), f"error codes {codes}" if any(codes) else "", [bytes(r) for r in records])


def read_frame(sock: socket.socket) -> bytes:
    """One Kafka frame (without its size) from ``sock``; ConnectionError when it closes."""

    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    (size,) = struct.unpack(">i", exact(4))
    return exact(size)
