"""Kafka policy in Envoy: the network ext_proc service and the filter chain that calls it.

Theory of operation
-------------------
Envoy cannot parse Kafka policy itself, so every Kafka port's filter chain
hands the raw byte stream to the agent over ``envoy.filters.network.ext_proc``:

    network RBAC (identity, shadow only) -> network ext_proc (agent) -> tcp_proxy (ORIGINAL_DST)

*Who is the peer.* ext_proc forwards nothing but dynamic metadata, so a
network RBAC filter runs first: its ``rules`` allow everything (L3/L4 is the
kernel's business), its ``shadow_rules`` hold one policy per peer identity,
``identity-<id>``, whose principals are that identity's IPs (or, in an Istio
sidecar, its SPIFFE principal). Envoy writes the matching policy's name under
``<shadow_rules_stat_prefix>shadow_effective_policy_id`` in the
``envoy.filters.network.rbac`` namespace, which ext_proc forwards. The stat
prefix itself names the chain (`ChainKey`: endpoint, direction, port), so one
stream tells the service both which rules apply and to whom. A peer no shadow
policy matched is world.

*What is done with the bytes.* `KafkaExtProcService` runs one
`KafkaConnection` (sans-IO) per stream, i.e. per client connection:
``read_data`` (client -> broker) is answered with ``read_data`` holding what
the processor lets through (possibly nothing: a partial frame is held back,
possibly a substitute: a denied request); ``write_data`` (broker -> client) is
answered with ``write_data`` holding the processor's bytes for the client (the
answers in order, a denied request's answer replaced by its error response).
A close from the processor (an unparsable frame, say) answers
``connection_status: CLOSE`` and ends the stream; a failure inside the service
does the same for that connection only.

The rules come from a `KafkaRulesLookup` the agent provides, asked once per
connection with the chain and the peer's identity; None closes the
connection (fail closed: a chain exists only while its rules do). After a
policy or identity change the agent calls `KafkaExtProcService.refresh`: every
open connection asks the lookup again and holds its next request to the
answer (no rules any more: every request is denied).

*Wire path.* Envoy sends every read and write as one message (with the
forwarded metadata on each) and every byte comes back in the answer, so on
large produce batches protobuf's own copies were a third of the service's
CPU. `register` therefore installs `Process` over raw bytes: `parse_request`
reads the three fields of ``ProcessingRequest`` straight off the wire (the data
as a view, no copy; anything unusual, such as a repeated field, goes through
protobuf instead) and `data_response` writes the answer with one copy. The
protobuf-level `KafkaExtProcService.Process` stays for direct callers and
shares the per-message core (`_respond`).

The builders are pure (protobuf messages only); the service does gRPC I/O.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import re
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc
from envoy.config.core.v3 import address_pb2, base_pb2, grpc_service_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.ext_proc.v3 import ext_proc_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.network_ext_proc.v3 import (
    network_external_processor_pb2 as pb,
)
from envoy.service.network_ext_proc.v3 import (
    network_external_processor_pb2_grpc as pb_grpc,
)
from google.protobuf import duration_pb2, wrappers_pb2

from flagella.policy.mapstate import L7Policy
from flagella.proxy.kafka import (
    KafkaAccessRecord,
    KafkaCodec,
    KafkaConnection,
    KafkaOutput,
    KafkaSettings,
    TopicIds,
)
from flagella.proxy.listeners import ORIGINAL_DST_CLUSTER, IPAddress, packed
from flagella.proxy.rbac import WORLD_IDENTITY, PeerSet

_log = logging.getLogger(__name__)

RBAC_NAMESPACE = "envoy.filters.network.rbac"
_POLICY_ID = "shadow_effective_policy_id"
_PREFIX = re.compile(r"flagella_kafka_(\d+)_(ingress|egress)_(\d+)_")
_IDENTITY = re.compile(r"identity-(\d+)")
_DENY_ALL = L7Policy("kafka")


@dataclass(frozen=True)
class ChainKey:
    """The chain a connection came through: an endpoint's port in one direction."""

    endpoint_id: int
    egress: bool
    port: int

    @property
    def stat_prefix(self) -> str:
        """The shadow rules' stat prefix; the service reads the chain back from it."""
        return f"flagella_kafka_{self.endpoint_id}_{'egress' if self.egress else 'ingress'}_{self.port}_"

    @property
    def name(self) -> str:
        return f"kafka/{self.endpoint_id}/{'egress' if self.egress else 'ingress'}/{self.port}"


class KafkaRulesLookup(Protocol):
    """The Kafka rules a peer identity is held to on a chain; None: none (close)."""

    def __call__(self, chain: ChainKey, identity: int) -> L7Policy | None: ...


@dataclass(frozen=True)
class Peer:
    """Who a stream's connection belongs to, as read from the forwarded metadata."""

    chain: ChainKey
    identity: int


class KafkaMetadataError(ValueError):
    """The forwarded metadata does not name a Flagella Kafka chain."""


def peer_from_metadata(filter_metadata: Mapping[str, Mapping[str, object]]) -> Peer:
    """The chain and peer identity from ext_proc's forwarded RBAC metadata."""
    fields = filter_metadata.get(RBAC_NAMESPACE, {})
    for key, value in fields.items():
        if not key.endswith(_POLICY_ID):
            continue
        match = _PREFIX.fullmatch(key[: -len(_POLICY_ID)])
        if match is None:
            continue
        chain = ChainKey(int(match[1]), match[2] == "egress", int(match[3]))
        ident = _IDENTITY.fullmatch(str(value))
        return Peer(chain, int(ident[1]) if ident else WORLD_IDENTITY)
    # No shadow policy matched: Envoy still reports the engine result under the prefix.
    for key in fields:
        match = re.fullmatch(_PREFIX.pattern + r"shadow_engine_result", key)
        if match is not None:
            return Peer(ChainKey(int(match[1]), match[2] == "egress", int(match[3])), WORLD_IDENTITY)
    raise KafkaMetadataError(
        f"metadata namespace {RBAC_NAMESPACE!r} names no Flagella Kafka chain "
        f"(keys: {sorted(fields)})"
    )


def _struct_fields(metadata: object) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for ns, struct in getattr(metadata, "filter_metadata", {}).items():
        out[ns] = {k: (v.string_value if v.HasField("string_value") else v) for k, v in struct.fields.items()}
    return out


class KafkaExtProcService(pb_grpc.NetworkExternalProcessorServicer):  # type: ignore[misc]
    """``envoy.service.network_ext_proc.v3.NetworkExternalProcessor`` for Kafka chains.

    Register on any ``grpc.aio`` server with `register`. ``on_record`` gets every
    judged request (monitor, metrics), ``on_peer_record`` the same with the connection's
    `Peer` (chain and identity); ``settings_for`` may give per-chain
    processor settings per peer (the default: transparent, nothing rewritten for addresses).
    """

    def __init__(
        self,
        rules: KafkaRulesLookup,
        *,
        codec: KafkaCodec | None = None,
        on_record: Callable[[KafkaAccessRecord], None] | None = None,
        settings_for: Callable[[Peer], KafkaSettings] | None = None,
        on_peer_record: Callable[[Peer, KafkaAccessRecord], None] | None = None,
    ) -> None:
        self.rules = rules
        self.codec = codec or KafkaCodec()
        self.on_record = on_record
        self.on_peer_record = on_peer_record
        #: The open connections and whose they are (`refresh`, `on_peer_record`).
        self._live: weakref.WeakKeyDictionary[KafkaConnection, Peer] = weakref.WeakKeyDictionary()
        self.settings_for = settings_for or (lambda _peer: KafkaSettings())
        self.topic_ids = TopicIds()
        #: Connections closed on a frame that could not be parsed (policy_l7_total parse_errors).
        self.unparsable = 0
        #: Close reasons, newest last (bounded): why the service closed connections.
        self.closes: list[str] = []

    def register(self, server: grpc.aio.Server) -> None:
        """Serve ``NetworkExternalProcessor/Process`` on ``server``, over raw bytes (`parse_request`)."""
        handlers = {"Process": grpc.stream_stream_rpc_method_handler(self.process_wire)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    def refresh(self) -> None:
        """The rules changed: every open connection gets its peer's current rules (on the
        server's loop, like the lookup). A peer left without rules is denied everything."""
        for conn, peer in list(self._live.items()):
            policy = self.rules(peer.chain, peer.identity)
            conn.update_policy(policy if policy is not None else _DENY_ALL)

    @property
    def open_connections(self) -> int:
        return len(self._live)

    def _connection(self, metadata: base_pb2.Metadata) -> KafkaConnection:
        peer = peer_from_metadata(_struct_fields(metadata))
        policy = self.rules(peer.chain, peer.identity)
        if policy is None:
            raise KafkaMetadataError(f"no Kafka rules for identity {peer.identity} on {peer.chain.name}")
        conn = KafkaConnection(
            peer.identity, policy, codec=self.codec, topic_ids=self.topic_ids,
            settings=self.settings_for(peer),
        )
        self._live[conn] = peer
        return conn

    def _closed(self, reason: str) -> pb.ProcessingResponse:
        self._note_close(reason)
        return pb.ProcessingResponse(connection_status=pb.ProcessingResponse.CLOSE)

    def _note_close(self, reason: str) -> None:
        if reason.startswith("unparsable"):
            self.unparsable += 1
        self.closes.append(reason)
        del self.closes[:-100]

    def _respond(
        self, conn: KafkaConnection, upstream: bool, data: bytes | memoryview
    ) -> bytes | memoryview | None:
        """The bytes Envoy injects for one read (``upstream``) or write; None: close."""
        out: KafkaOutput = (
            conn.receive_from_client(data) if upstream else conn.receive_from_broker(data)
        )
        if self.on_record is not None:
            for record in out.records:
                self.on_record(record)
        if self.on_peer_record is not None and out.records:
            peer = self._live[conn]
            for record in out.records:
                self.on_peer_record(peer, record)
        if out.close is not None:
            self._note_close(out.close)
            return None
        return out.to_broker if upstream else out.to_client

    async def Process(  # noqa: N802 (the gRPC method's name)
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """The service over protobuf messages (direct callers; `register` serves `process_wire`)."""
        conn: KafkaConnection | None = None
        async for request in request_iterator:
            try:
                if conn is None:
                    conn = self._connection(request.metadata)
                upstream = request.HasField("read_data")
                data = request.read_data if upstream else request.write_data
                payload = self._respond(conn, upstream, data.data)
            except Exception as exc:  # one connection fails closed, never the service
                _log.warning("kafka ext_proc: closing a connection: %s", exc)
                yield self._closed(f"{type(exc).__name__}: {exc}")
                return
            if payload is None:
                yield pb.ProcessingResponse(connection_status=pb.ProcessingResponse.CLOSE)
                return
            response = pb.ProcessingResponse(data_processing_status=pb.ProcessingResponse.MODIFIED)
            answer = response.read_data if upstream else response.write_data
            answer.data = bytes(payload)
            answer.end_of_stream = data.end_of_stream
            yield response

    async def process_wire(
        self, request_iterator: AsyncIterator[bytes], context: object
    ) -> AsyncIterator[bytes]:
        """`Process` over serialized messages: what `register` serves (module docstring)."""
        conn: KafkaConnection | None = None
        async for raw in request_iterator:
            try:
                request = parse_request(raw)
                if conn is None:
                    conn = self._connection(request.metadata())
                payload = self._respond(conn, request.upstream, request.data)
            except Exception as exc:  # one connection fails closed, never the service
                _log.warning("kafka ext_proc: closing a connection: %s", exc)
                self._note_close(f"{type(exc).__name__}: {exc}")
                yield _CLOSE
                return
            if payload is None:
                yield _CLOSE
                return
            yield data_response(request.upstream, payload, request.end_of_stream)


def tune_allocator() -> bool:
    """Keep this process's freed heap for the next large message (glibc only).

    Every Kafka read and write crosses this process as a gRPC message of up to the
    listener's buffer (1 MiB), several times over (grpc's buffers, the message, the
    answer). With glibc's defaults each such buffer is returned to the kernel when freed
    and faulted in again, page by page, when the next one comes: on a produce stream that
    was a fifth of the service's CPU (BENCHMARKS.md, Kafka). So: allocations below 4 MiB
    come from the heap, and up to 64 MiB of free heap is kept. Returns whether it applied.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(libc.mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 4 << 20), (m_trim_threshold, 64 << 20), (m_top_pad, 16 << 20),
    ))


# -- the wire path -------------------------------------------------------------------------

SERVICE_NAME = "envoy.service.network_ext_proc.v3.NetworkExternalProcessor"
_CLOSE = pb.ProcessingResponse(connection_status=pb.ProcessingResponse.CLOSE).SerializeToString()
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
#: ProcessingResponse: read_data = 1, write_data = 2, data_processing_status = 3 (MODIFIED).
_MODIFIED = bytes([3 << 3 | _VARINT, pb.ProcessingResponse.MODIFIED])


class WireError(ValueError):
    """A ProcessingRequest that is not valid protobuf."""


@dataclass(frozen=True)
class WireRequest:
    """One ProcessingRequest: its direction, data (a view into the message) and metadata."""

    upstream: bool  # read_data (client -> broker); else write_data
    data: bytes | memoryview
    end_of_stream: bool
    _metadata: memoryview | base_pb2.Metadata | None

    def metadata(self) -> base_pb2.Metadata:
        if isinstance(self._metadata, base_pb2.Metadata):
            return self._metadata
        return base_pb2.Metadata.FromString(bytes(self._metadata or b""))


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 64, 7):
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >> 64:
                raise WireError("varint out of range")
            return value, pos
    raise WireError("varint longer than 10 bytes")


def _fields(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(field, wire type, start, end) of each field in ``buf[start:end]``; varints as their value."""
    out = []
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if not 0 < field < 1 << 29:
            raise WireError(f"field number {field}")
        if wire == _LEN:
            size, pos = _varint(buf, pos)
            out.append((field, wire, pos, pos + size))
            pos += size
        elif wire == _VARINT:
            value, pos = _varint(buf, pos)
            out.append((field, wire, value, value))
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        else:
            raise WireError(f"wire type {wire}")
        if pos > end:
            raise WireError("truncated field")
    return out


def parse_request(raw: bytes) -> WireRequest:
    """A serialized ProcessingRequest, read without copying its data (module docstring)."""
    try:
        fields = _fields(raw, 0, len(raw))
        top = [f for f in fields if f[1] == _LEN and f[0] in (1, 2, 3)]
        numbers = [f[0] for f in top]
        if len(set(numbers)) == len(numbers) and not (1 in numbers and 2 in numbers):
            view = memoryview(raw)
            data: memoryview | bytes = b""
            end_of_stream = False
            upstream = 1 in numbers
            metadata: memoryview | None = None
            for number, _wire, start, end in top:
                if number == 3:
                    metadata = view[start:end]
                    continue
                for field, wire, a, b in _fields(raw, start, end):
                    if field == 1 and wire == _LEN:
                        data = view[a:b]
                    elif field == 2 and wire == _VARINT:
                        end_of_stream = a != 0
            return WireRequest(upstream, data, end_of_stream, metadata)
    except WireError:
        pass
    # Anything unusual (a repeated message field merges; both directions; bad bytes): protobuf.
    request = pb.ProcessingRequest.FromString(raw)
    upstream = request.HasField("read_data")
    payload = request.read_data if upstream else request.write_data
    return WireRequest(upstream, payload.data, payload.end_of_stream, request.metadata)


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def data_response(upstream: bool, payload: bytes | memoryview, end_of_stream: bool) -> bytes:
    """ProcessingResponse{read_data or write_data: {data, end_of_stream}, MODIFIED}, serialized
    as protobuf would, with ``payload`` copied once."""
    head = b"\x0a" + _uvarint(len(payload)) if len(payload) else b""
    tail = b"\x10\x01" if end_of_stream else b""
    size = len(head) + len(payload) + len(tail)
    tag = b"\x0a" if upstream else b"\x12"
    return b"".join((tag, _uvarint(size), head, payload, tail, _MODIFIED))


# -- builders ----------------------------------------------------------------------------


def ip_principals(peers: Mapping[int, PeerSet]) -> dict[int, list[rbac_pb2.Principal]]:
    """Node proxy: each identity's principals are its source IPs."""
    out: dict[int, list[rbac_pb2.Principal]] = {}
    for ident, peer in peers.items():
        include = [rbac_pb2.Principal(direct_remote_ip=_cidr(n)) for n in peer.include]
        principal = rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=include))
        if peer.exclude:
            principal = rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=[
                principal,
                *(rbac_pb2.Principal(not_id=rbac_pb2.Principal(direct_remote_ip=_cidr(n))) for n in peer.exclude),
            ]))
        out[ident] = [principal]
    return out


def spiffe_principals(identities: Mapping[int, Iterable[str]]) -> dict[int, list[rbac_pb2.Principal]]:
    """Istio sidecar: each identity's principals are its SPIFFE ids (mTLS peer certificate)."""
    from envoy.type.matcher.v3 import string_pb2

    return {
        ident: [rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(
            principal_name=string_pb2.StringMatcher(exact=uri))) for uri in uris]
        for ident, uris in identities.items()
    }


def _cidr(net: object) -> address_pb2.CidrRange:
    import ipaddress

    n = ipaddress.ip_network(net)  # type: ignore[arg-type]
    return address_pb2.CidrRange(address_prefix=str(n.network_address), prefix_len=wrappers_pb2.UInt32Value(value=n.prefixlen))


def identity_rbac(chain: ChainKey, principals: Mapping[int, list[rbac_pb2.Principal]]) -> net_rbac_pb2.RBAC:
    """Allow-all rules; shadow rules that name the peer's identity (module docstring)."""
    anything = rbac_pb2.Policy(
        permissions=[rbac_pb2.Permission(any=True)], principals=[rbac_pb2.Principal(any=True)]
    )
    return net_rbac_pb2.RBAC(
        stat_prefix=chain.stat_prefix,
        rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies={"allow-all": anything}),
        shadow_rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies={
            f"identity-{ident}": rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)], principals=ps)
            for ident, ps in sorted(principals.items())
        }),
        shadow_rules_stat_prefix=chain.stat_prefix,
    )


def kafka_ext_proc(chain: ChainKey, grpc_service: grpc_service_pb2.GrpcService) -> ext_proc_pb2.NetworkExternalProcessor:
    """The ext_proc filter config, the same for the node proxy and an Istio sidecar."""
    return ext_proc_pb2.NetworkExternalProcessor(
        grpc_service=grpc_service,
        failure_mode_allow=False,
        processing_mode=ext_proc_pb2.ProcessingMode(),  # both directions STREAMED
        message_timeout=duration_pb2.Duration(seconds=2),
        stat_prefix=chain.stat_prefix,
        metadata_options=ext_proc_pb2.MetadataOptions(
            forwarding_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(untyped=[RBAC_NAMESPACE])
        ),
    )


def agent_grpc_service(cluster: str) -> grpc_service_pb2.GrpcService:
    """Node proxy: the agent's gRPC server is a static cluster (``envoy_grpc``)."""
    return grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster))


def sidecar_grpc_service(unix_socket: str) -> grpc_service_pb2.GrpcService:
    """Istio sidecar: the agent's socket mounted into the pod, reached with ``google_grpc``
    (an ``envoy_grpc`` cluster added through EnvoyFilter is rejected, see DESIGN.md)."""
    return grpc_service_pb2.GrpcService(google_grpc=grpc_service_pb2.GrpcService.GoogleGrpc(
        target_uri=f"unix:{unix_socket}", stat_prefix="flagella_kafka"))


def kafka_enforcement_filters(
    chain: ChainKey,
    principals: Mapping[int, list[rbac_pb2.Principal]],
    grpc_service: grpc_service_pb2.GrpcService,
) -> list[listener_components_pb2.Filter]:
    """RBAC (identity) -> ext_proc: what an Istio sidecar's EnvoyFilter inserts before its
    own ``tcp_proxy`` (with `spiffe_principals` and `sidecar_grpc_service`)."""
    return [
        listener_components_pb2.Filter(name="envoy.filters.network.rbac", typed_config=packed(identity_rbac(chain, principals))),
        listener_components_pb2.Filter(name="envoy.filters.network.ext_proc", typed_config=packed(kafka_ext_proc(chain, grpc_service))),
    ]


def kafka_network_filters(
    chain: ChainKey,
    principals: Mapping[int, list[rbac_pb2.Principal]],
    grpc_service: grpc_service_pb2.GrpcService,
    *,
    upstream_cluster: str = ORIGINAL_DST_CLUSTER,
) -> list[listener_components_pb2.Filter]:
    """RBAC (identity) -> ext_proc -> tcp_proxy. (``kafka_broker`` for stats is a contrib
    filter whose v3 proto xds-protos does not ship; the processor's records count instead.)"""
    tcp_proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=chain.stat_prefix, cluster=upstream_cluster)
    return [
        *kafka_enforcement_filters(chain, principals, grpc_service),
        listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy", typed_config=packed(tcp_proxy)),
    ]


@dataclass(frozen=True)
class KafkaRedirect:
    """One endpoint port whose Kafka traffic the node proxy enforces."""

    chain: ChainKey
    #: The endpoint's addresses: the destination on ingress, the source on egress.
    addresses: tuple[IPAddress, ...]


def kafka_filter_chain(
    redirect: KafkaRedirect,
    principals: Mapping[int, list[rbac_pb2.Principal]],
    agent_cluster: str,
) -> listener_components_pb2.FilterChain:
    """The node proxy's transparent-listener chain for one Kafka port (see listeners.py)."""
    chain = redirect.chain
    match = listener_components_pb2.FilterChainMatch(destination_port=wrappers_pb2.UInt32Value(value=chain.port))
    cidrs = [_cidr(a) for a in redirect.addresses]
    (match.source_prefix_ranges if chain.egress else match.prefix_ranges).extend(cidrs)
    return listener_components_pb2.FilterChain(
        name=chain.name,
        filter_chain_match=match,
        filters=kafka_network_filters(chain, principals, agent_grpc_service(agent_cluster)),
    )


__all__ = [
    "RBAC_NAMESPACE",
    "SERVICE_NAME",
    "ChainKey",
    "KafkaExtProcService",
    "KafkaMetadataError",
    "KafkaRedirect",
    "KafkaRulesLookup",
    "Peer",
    "WireError",
    "WireRequest",
    "agent_grpc_service",
    "data_response",
    "identity_rbac",
    "ip_principals",
    "kafka_enforcement_filters",
    "kafka_ext_proc",
    "kafka_filter_chain",
    "kafka_network_filters",
    "parse_request",
    "peer_from_metadata",
    "sidecar_grpc_service",
    "spiffe_principals",
    "tune_allocator",
]
