"""A Kafka client of the Kafka guide demo (runs inside a pod's netns), kafka-python.

    demo-kafka.py produce BROKER TOPIC MESSAGE
    demo-kafka.py consume BROKER TOPIC
    demo-kafka.py fetch BROKER TOPIC      (a raw Fetch, as an attacker skipping Metadata)

Prints what happened as the guide's scripts do: the message read, or the error the
broker's answer carried (e.g. TopicAuthorizationFailedError). Consumes with
``assign()`` from the start of partition 0 (no consumer group).
"""

import sys
import time

from kafka.errors import KafkaError, TopicAuthorizationFailedError

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def produce(broker: str, topic: str, message: str) -> int:
    producer = KafkaProducer(bootstrap_servers=broker, acks=1, retries=0, max_block_ms=10000)
    try:
        producer.send(topic, message.encode()).get(timeout=15)
        print(f"produced to {topic}: {message}")
        return 0
    except KafkaError as exc:
        print(f"ERROR Error when sending message to topic {topic}: {type(exc).__name__}: {exc}")
        return 1
    finally:
        producer.close(timeout=5)


def consume(broker: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=broker, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(topic, 0)])
        deadline = time.monotonic() + 6
        got = 0
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    print(f"consumed from {topic}: {r.value.decode(errors='replace')}")
                    got += 1
            if got:
                return 0
            if topic in consumer._client.cluster.unauthorized_topics:
                # kafka-python keeps the Metadata error of a topic it may not see here.
                print(f"WARN Error while fetching metadata: {{{topic}={TopicAuthorizationFailedError.__name__}}}"
                      " (TOPIC_AUTHORIZATION_FAILED)")
                return 1
        print(f"nothing consumed from {topic}")
        return 1
    except KafkaError as exc:
        print(f"ERROR consuming {topic}: {type(exc).__name__}: {exc}")
        return 1
    finally:
        consumer.close()


def fetch(broker: str, topic: str) -> int:
    """A Fetch of partition 0 and an ApiVersions after it, pipelined on one connection."""
    import socket
    import struct

    from flagella.proxy.kafka import KafkaCodec

    codec = KafkaCodec()
    host, _, port = broker.rpartition(":")
    request = {"MaxWaitMs": 10, "MinBytes": 1, "MaxBytes": 1 << 20, "Topics": [
        {"Topic": topic, "Partitions": [{"Partition": 0, "FetchOffset": 0, "PartitionMaxBytes": 1 << 20}]}]}
    with socket.create_connection((host, int(port)), 10) as sock:
        sock.sendall(codec.encode_request(1, 4, 2, "demo-fetch", request)
                     + codec.encode_request(18, 2, 3, "demo-fetch", {}))
        stream = sock.makefile("rb")

        def frame() -> bytes:
            (size,) = struct.unpack(">i", stream.read(4))
            return bytes(stream.read(size))

        corr, answer = codec.decode_response(1, 4, frame())
        for t in answer["Responses"]:
            for part in t["Partitions"]:
                code = part["ErrorCode"]
                name = " TOPIC_AUTHORIZATION_FAILED" if code == 29 else ""
                print(f"Fetch (correlation id {corr}) {t['Topic']}-{part.get('PartitionIndex', 0)}: error {code}{name}")
        corr, versions = codec.decode_response(18, 2, frame())
        print(f"ApiVersions (correlation id {corr}) answered on the same connection: it stays open")
    return 0


if __name__ == "__main__":
    op, broker, topic, *rest = sys.argv[1:]
    if op == "produce":
        sys.exit(produce(broker, topic, " ".join(rest)))
    sys.exit(consume(broker, topic) if op == "consume" else fetch(broker, topic))
