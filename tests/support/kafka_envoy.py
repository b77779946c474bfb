"""A real Envoy running the Kafka chain (RBAC identity -> ext_proc -> tcp_proxy)
in front of a broker, with the agent's ext_proc service on a unix-socket grpc.aio server.

Theory of operation
-------------------
Envoy listens on 127.0.0.1 with `flagella.proxy.kafka_envoy.kafka_network_filters`;
its shadow RBAC rules map each pod's own loopback source address (127.0.0.x) to
the pod's identity. Kafka clients cannot choose their source address, so each pod
gets a plain byte relay (no processor) that connects to Envoy from the pod's
address. The processor advertises that relay as the broker in Metadata answers,
so every connection a client opens (bootstrap and broker) goes through Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import json_format

from flagella.policy.mapstate import L7Policy
from flagella.proxy.envoy import XDS_CLUSTER, EnvoyProcess, bootstrap, free_port
from flagella.proxy.kafka import KafkaAccessRecord, KafkaCodec, KafkaSettings
from flagella.proxy.kafka_envoy import (
    ChainKey,
    KafkaExtProcService,
    KafkaRulesLookup,
    Peer,
    agent_grpc_service,
    ip_principals,
    kafka_network_filters,
)
from flagella.proxy.rbac import PeerSet
from tests.support.kafka_relay import KafkaRelay

_base_ids = itertools.count(43000 + os.getpid() % 1000 * 10)
CHAIN = ChainKey(endpoint_id=7, egress=False, port=9092)


@dataclass(frozen=True)
class Pod:
    identity: int
    policy: L7Policy
    source: str  # its loopback address, e.g. 127.0.0.11


@dataclass
class KafkaEnvoy:
    envoy: EnvoyProcess
    port: int
    service: KafkaExtProcService
    records: list[KafkaAccessRecord] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)  # pod -> its relay, host:port


@contextlib.contextmanager
def grpc_server(service: KafkaExtProcService, socket_path: str) -> Iterator[None]:
    """The agent's gRPC server (here only the ext_proc service) in its own loop thread."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    server: list[grpc.aio.Server] = []

    async def serve() -> None:
        srv = grpc.aio.server()
        service.register(srv)
        srv.add_insecure_port(f"unix:{socket_path}")
        await srv.start()
        server.append(srv)
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10), "the gRPC server did not start"
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(server[0].stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _json(msg: object) -> dict[str, object]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)  # type: ignore[arg-type]


@contextlib.contextmanager
def kafka_envoy(
    broker: tuple[str, int], pods: Mapping[str, Pod], codec: KafkaCodec, *, enforce: bool = True,
    relays: bool = True, chain: ChainKey = CHAIN, rules: KafkaRulesLookup | None = None,
) -> Iterator[KafkaEnvoy]:
    """Envoy + the ext_proc service in front of ``broker``; ``enforce=False``: tcp_proxy only.
    ``relays=False`` (one pod, source 127.0.0.1): clients talk to Envoy itself, which
    Metadata answers advertise (the benchmark's setting: no extra hop). ``chain`` is the
    chain the stat prefix names; ``rules`` replaces the pods' policies as the lookup (the
    pods' identities are then whatever the chain's peer is, e.g. a destination on egress)."""
    workdir = Path(tempfile.mkdtemp(prefix="flagella-kafka-envoy-"))
    socket_path = str(workdir / "agent.sock")
    by_identity = {p.identity: p for p in pods.values()}
    relay_port: dict[int, int] = {}

    def pod_rules(asked: ChainKey, identity: int) -> L7Policy | None:
        pod = by_identity.get(identity)
        return pod.policy if pod is not None and asked == chain else None

    def settings(peer: Peer) -> KafkaSettings:
        return KafkaSettings(advertised_broker=("127.0.0.1", relay_port[peer.identity]))

    service = KafkaExtProcService(rules or pod_rules, codec=codec, settings_for=settings)
    port = free_port()
    principals = ip_principals({
        p.identity: PeerSet((ipaddress.ip_network(f"{p.source}/32"),)) for p in pods.values()
    })
    filters = kafka_network_filters(chain, principals, agent_grpc_service(XDS_CLUSTER), upstream_cluster="broker")
    if not enforce:
        filters = filters[-1:]
    listener = {
        "name": "kafka",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [
            {"name": f.name, "typed_config": _json(f.typed_config)}
            for f in filters
        ]}],
    }
    cluster = {
        "name": "broker", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "broker", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": broker[0], "port_value": broker[1]}}}}]}]},
    }
    config = bootstrap("kafka-test", socket_path, free_port(),
                       static_resources={"listeners": [listener], "clusters": [cluster]}, ads=False)
    envoy = EnvoyProcess(config, base_id=next(_base_ids), workdir=workdir)
    with contextlib.ExitStack() as stack, grpc_server(service, socket_path):
        out = KafkaEnvoy(envoy, port, service)
        service.on_record = out.records.append
        for name, pod in pods.items():
            if not relays:
                relay_port[pod.identity] = port
                out.addresses[name] = f"127.0.0.1:{port}"
                continue
            relay = stack.enter_context(KafkaRelay(("127.0.0.1", port), pod.identity, None, codec,
                                                   local_addr=pod.source))
            relay_port[pod.identity] = relay.port
            out.addresses[name] = relay.address
        envoy.start()
        try:
            yield out
        finally:
            envoy.stop()
