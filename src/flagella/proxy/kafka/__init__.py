"""Kafka policy enforcement, sans-IO.

`KafkaCodec` reads and writes every Kafka request and response, driven by
Kafka's own message definitions (`_schema`, `_wire`, `_protocol`).
`KafkaConnection` is the per-connection policy processor: bytes from the client
and from the broker in, bytes for each side out (`_processor` tells how denials
keep Kafka's strict answer order). Neither does I/O: Envoy's network ext_proc
stream, or any relay, carries the bytes.
"""

from flagella.proxy.kafka._processor import (
    KafkaAccessRecord,
    KafkaConnection,
    KafkaOutput,
    KafkaSettings,
    TopicIds,
)
from flagella.proxy.kafka._protocol import (
    CLUSTER_AUTHORIZATION_FAILED,
    GROUP_AUTHORIZATION_FAILED,
    TOPIC_AUTHORIZATION_FAILED,
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaCodec,
    KafkaRequest,
)
from flagella.proxy.kafka._schema import Catalog, KafkaSchemaError, default_catalog
from flagella.proxy.kafka._wire import KafkaDecodeError, KafkaEncodeError

__all__ = [
    "CLUSTER_AUTHORIZATION_FAILED",
    "GROUP_AUTHORIZATION_FAILED",
    "TOPIC_AUTHORIZATION_FAILED",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    "Catalog",
    "KafkaAccessRecord",
    "KafkaCodec",
    "KafkaConnection",
    "KafkaDecodeError",
    "KafkaEncodeError",
    "KafkaOutput",
    "KafkaRequest",
    "KafkaSchemaError",
    "KafkaSettings",
    "TopicIds",
    "default_catalog",
]
