"""grpc.aio xDS services over the cache and the sans-IO stream state.

Theory of operation
- One grpc.aio server serves ADS (SotW and delta) and the per-type services
  (CDS, EDS, LDS, RDS, ECDS, each SotW and delta) on a unix socket (mode
  0660) and, when configured, on TCP with TLS. Every RPC is handled by the
  same loop: a reader feeds decoded requests to `StreamState.receive`, and one
  writer task per stream asks `StreamState.next_response` for each type, in
  `PUSH_ORDER`, and writes the encoded bytes. Responses are already bytes (the
  cache's shared resource fields inside a hand-built envelope), so the gRPC
  response serializer is the identity.
- A cache change (`set_resources`, `update`) goes through the debouncer
  (100 ms quiet, 10 s max, on an injected clock), then wakes every stream's
  writer; a semaphore bounds how many streams encode and write at once. A
  request from Envoy (new subscription, ACK) wakes its own writer at once.
- On ADS, clusters that a push removes are kept in the CDS response sent
  before EDS/LDS/RDS and removed by a final CDS response, so a listener or
  route never points at a cluster that is gone.
- `set_resources`/`update` return a completion: a future that resolves when
  every connected stream subscribed to that type has ACKed a response built
  from this change or a later one, and fails with `XdsNack` when one NACKs it
  or with `XdsTimeout` after `ack_timeout`. This is the enforcer seam's
  completion (Cilium's proxy ACK).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import structlog
from envoy.service.discovery.v3 import discovery_pb2

from flagella.errors import FlagellaError, InputError
from flagella.xds.cache import CachedResource, Message, ResourceCache, TypeView
from flagella.xds.debounce import Clock, Debouncer, MonotonicClock
from flagella.xds.status import NodeStatus, TypeStatus, XdsMetrics
from flagella.xds.stream import Acked, Ignored, Nacked, Phase, Request, StreamState, Subscribed
from flagella.xds.types import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    ROUTE,
    push_rank,
    short_name,
)

log = structlog.get_logger("flagella.xds")


class XdsError(FlagellaError):
    """An xDS push did not complete."""


class XdsNack(XdsError):
    def __init__(self, node: str, type_url: str, version: str, detail: str) -> None:
        self.node, self.type_url, self.version, self.detail = node, type_url, version, detail
        super().__init__(f"node {node} rejected {short_name(type_url)} version {version}: {detail}")


class XdsTimeout(XdsError):
    pass


@dataclass(frozen=True)
class XdsSettings:
    """Where the server listens and how it pushes.

    - `unix_socket`: path of the socket Envoy's bootstrap names; created with `socket_mode`.
    - `tcp_address`: optional "host:port"; requires `tls_cert` and `tls_key`
      (and `tls_client_ca` to require client certificates).
    - `debounce_quiet`/`debounce_max`: istiod's 100 ms / 10 s.
    - `max_concurrent_pushes`: streams encoding and writing at once.
    - `ack_timeout`: seconds before a completion fails with `XdsTimeout`.
    - `write_timeout`: seconds a stream may hold a push slot writing one response. A
      stream whose peer stops reading (a stalled or hostile client) then gives its slot
      back and waits for its peer alone, so it cannot starve every other Envoy.
    """

    unix_socket: Path
    socket_mode: int = 0o660
    tcp_address: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    debounce_quiet: float = 0.1
    debounce_max: float = 10.0
    max_concurrent_pushes: int = 64
    ack_timeout: float = 30.0
    write_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.tcp_address and not (self.tls_cert and self.tls_key):
            raise InputError("xds.tcp_address: requires tls_cert and tls_key")
        if self.max_concurrent_pushes < 1:
            raise InputError("xds.max_concurrent_pushes: must be at least 1")
        if not self.write_timeout > 0:
            raise InputError("xds.write_timeout: must be > 0")
        if not 0 < self.debounce_quiet <= self.debounce_max:
            raise InputError("xds.debounce_quiet: must be > 0 and <= debounce_max")


# service full name -> (SotW method, delta method, fixed type URL or None for ADS)
SERVICES: dict[str, tuple[str, str, str | None]] = {
    "envoy.service.discovery.v3.AggregatedDiscoveryService": (
        "StreamAggregatedResources",
        "DeltaAggregatedResources",
        None,
    ),
    "envoy.service.cluster.v3.ClusterDiscoveryService": ("StreamClusters", "DeltaClusters", CLUSTER),
    "envoy.service.endpoint.v3.EndpointDiscoveryService": ("StreamEndpoints", "DeltaEndpoints", ENDPOINT),
    "envoy.service.listener.v3.ListenerDiscoveryService": ("StreamListeners", "DeltaListeners", LISTENER),
    "envoy.service.route.v3.RouteDiscoveryService": ("StreamRoutes", "DeltaRoutes", ROUTE),
    "envoy.service.extension.v3.ExtensionConfigDiscoveryService": (
        "StreamExtensionConfigs",
        "DeltaExtensionConfigs",
        EXTENSION_CONFIG,
    ),
}


def _identity(payload: bytes) -> bytes:
    return payload


@dataclass(eq=False)
class _Connection:
    id: int
    state: StreamState
    kind: str
    fixed_type: str | None
    connected_at: float
    node: str = ""
    cluster: str = ""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    generation_sent: dict[str, int] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)  # types to answer; every type on a push


@dataclass(eq=False)
class _Completion:
    type_url: str
    generation: int
    waiting: set[int]
    future: asyncio.Future[None]


class XdsServer:
    def __init__(
        self,
        settings: XdsSettings,
        *,
        cache: ResourceCache | None = None,
        clock: Clock | None = None,
        metrics: XdsMetrics | None = None,
        services: Iterable[Callable[[grpc.aio.Server], None]] = (),
    ) -> None:
        """``services`` add other gRPC services to the same server before it starts
        (the node proxy's access-log service, on the socket Envoy already uses)."""
        self.settings = settings
        self._services = list(services)
        self.cache = cache if cache is not None else ResourceCache()
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.metrics = metrics if metrics is not None else XdsMetrics()
        self._debouncer = Debouncer(settings.debounce_quiet, settings.debounce_max)
        self._changed = asyncio.Event()
        self._semaphore = asyncio.Semaphore(settings.max_concurrent_pushes)
        self._connections: dict[int, _Connection] = {}
        self._completions: list[_Completion] = []
        self._ids = itertools.count(1)
        self._generation = 0
        self._server: grpc.aio.Server | None = None
        self._pusher: asyncio.Task[None] | None = None
        self.pushes_done = 0  # debounced pushes run; tests and benchmarks read it

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        server.add_generic_rpc_handlers(tuple(self._handlers()))
        for add in self._services:
            add(server)
        path = self.settings.unix_socket
        path.unlink(missing_ok=True)
        server.add_insecure_port(f"unix:{path}")
        if self.settings.tcp_address:
            server.add_secure_port(self.settings.tcp_address, self._tls_credentials())
        await server.start()
        os.chmod(path, self.settings.socket_mode)
        self._server = server
        self._pusher = asyncio.create_task(self._push_loop())

    async def stop(self, grace: float | None = 0.5) -> None:
        if self._pusher is not None:
            self._pusher.cancel()
        if self._server is not None:
            await self._server.stop(grace)
        for completion in self._completions:
            if not completion.future.done():
                completion.future.set_exception(XdsError("xds server stopped"))
        self._completions.clear()

    def _tls_credentials(self) -> grpc.ServerCredentials:
        s = self.settings
        assert s.tls_cert is not None and s.tls_key is not None
        ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def _handlers(self) -> Iterable[grpc.GenericRpcHandler]:
        for service, (sotw, delta, fixed) in SERVICES.items():
            yield grpc.method_handlers_generic_handler(
                service,
                {
                    sotw: grpc.stream_stream_rpc_method_handler(
                        self._rpc(delta=False, fixed_type=fixed),
                        request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                        response_serializer=_identity,
                    ),
                    delta: grpc.stream_stream_rpc_method_handler(
                        self._rpc(delta=True, fixed_type=fixed),
                        request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                        response_serializer=_identity,
                    ),
                },
            )

    # -- resources and completions --------------------------------------------

    def set_resources(
        self, type_url: str, resources: Mapping[str, Message], node: str | None = None
    ) -> asyncio.Future[None]:
        """Replace every resource of `type_url` (globally or for `node`)."""
        self.cache.set_resources(type_url, resources, node)
        return self._changed_type(type_url, node)

    def set_base(self, type_url: str, resources: Mapping[str, Message]) -> asyncio.Future[None]:
        """Replace the base resources of `type_url` (see `ResourceCache.set_base`)."""
        self.cache.set_base(type_url, resources)
        return self._changed_type(type_url, None)

    def update(
        self,
        type_url: str,
        upserts: Mapping[str, Message] | None = None,
        removals: Iterable[str] = (),
        node: str | None = None,
    ) -> asyncio.Future[None]:
        """Upsert and remove some resources of `type_url`."""
        self.cache.update(type_url, upserts, removals, node)
        return self._changed_type(type_url, node)

    def _changed_type(self, type_url: str, node: str | None) -> asyncio.Future[None]:
        self._generation += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiting = set()
        for conn in self._connections.values():
            ts = conn.state.types.get(type_url)
            if not conn.node or ts is None or ts.phase is Phase.UNSUBSCRIBED:
                continue
            if node is not None and conn.node != node:
                continue
            if ts.version_acked == ts.version_of(self.cache.view(conn.node, type_url)):
                continue  # nothing it asked for changed: it gets nothing, so no ACK is awaited
            waiting.add(conn.id)
        if waiting:
            completion = _Completion(type_url, self._generation, waiting, future)
            self._completions.append(completion)
            loop.call_later(self.settings.ack_timeout, self._expire, completion)
        else:
            future.set_result(None)
        self._debouncer.changed(self.clock.now())
        self._changed.set()
        return future

    def _expire(self, completion: _Completion) -> None:
        if not completion.future.done():
            completion.future.set_exception(
                XdsTimeout(f"{short_name(completion.type_url)}: no ACK from {len(completion.waiting)} stream(s)")
            )
        if completion in self._completions:
            self._completions.remove(completion)

    def _settle(self, conn: _Connection, type_url: str, nack: Nacked | None) -> None:
        sent_generation = conn.generation_sent.get(type_url, 0)
        for completion in list(self._completions):
            if completion.type_url != type_url or conn.id not in completion.waiting:
                continue
            if sent_generation < completion.generation:
                continue
            if nack is not None:
                if not completion.future.done():
                    completion.future.set_exception(XdsNack(conn.node, type_url, nack.version, nack.error))
                self._completions.remove(completion)
                continue
            completion.waiting.discard(conn.id)
            self._finish_if_empty(completion)

    def _finish_if_empty(self, completion: _Completion) -> None:
        if not completion.waiting:
            if not completion.future.done():
                completion.future.set_result(None)
            if completion in self._completions:
                self._completions.remove(completion)

    # -- pushing -----------------------------------------------------------------

    async def _push_loop(self) -> None:
        while True:
            await self._changed.wait()
            while (delay := self._debouncer.due_in(self.clock.now())) is not None and delay > 0:
                await self.clock.sleep(delay)
            self._debouncer.fired()
            self._changed.clear()
            self.pushes_done += 1
            for conn in self._connections.values():
                conn.dirty |= set(conn.state.types)
                conn.wake.set()

    async def _writer(self, conn: _Connection, context: Any) -> None:
        while True:
            await conn.wake.wait()
            conn.wake.clear()
            if not conn.node:
                continue
            write: asyncio.Future[None] | None = None
            stalled = False
            try:
                async with self._semaphore:
                    payloads = self._responses(conn)
                    while payloads:
                        write = asyncio.ensure_future(context.write(payloads.pop(0)))
                        await asyncio.wait((write,), timeout=self.settings.write_timeout)
                        if not write.done():
                            stalled = True  # the peer stopped reading: give the slot back
                            break
                        write.result()
                if stalled and write is not None:
                    self.metrics.stalled.inc()
                    log.warning("xds.stalled", node=conn.node, stream=conn.kind,
                                waited=self.settings.write_timeout)
                    await write  # on this stream's own time, holding no slot
                    for payload in payloads:
                        await context.write(payload)
            except asyncio.CancelledError:
                if write is not None:
                    write.cancel()  # the stream ended: its write goes with it
                raise

    def _responses(self, conn: _Connection) -> list[bytes]:
        types = sorted(conn.dirty, key=lambda u: (push_rank(u), u))
        conn.dirty.clear()
        ads = conn.fixed_type is None
        out: list[bytes] = []
        final_cds: TypeView | None = None
        for type_url in types:
            view = self.cache.view(conn.node, type_url)
            if ads and type_url == CLUSTER:
                ts = conn.state.types[type_url]
                going = {n: r for n, r in ts.sent.items() if n not in view.resources}
                if going:
                    final_cds = view
                    view = _with(view, going)
            out += self._encode(conn, view)
        if final_cds is not None:
            out += self._encode(conn, final_cds)
        return out

    def _encode(self, conn: _Connection, view: TypeView) -> list[bytes]:
        response = conn.state.next_response(view)
        if response is None:
            return []
        conn.generation_sent[view.type_url] = self._generation
        conn.sent_at[view.type_url] = self.clock.now()
        self.metrics.pushes.labels(short_name(view.type_url)).inc()
        return [response.payload]

    # -- streams -------------------------------------------------------------------

    def _rpc(
        self, *, delta: bool, fixed_type: str | None
    ) -> Callable[[AsyncIterator[Any], Any], Any]:
        kind = ("ads" if fixed_type is None else short_name(fixed_type).lower()) + ("-delta" if delta else "")

        async def handle(requests: AsyncIterator[Any], context: Any) -> None:
            conn = _Connection(
                id=next(self._ids),
                state=StreamState(delta=delta),
                kind=kind,
                fixed_type=fixed_type,
                connected_at=time.time(),
            )
            self._connections[conn.id] = conn
            writer = asyncio.create_task(self._writer(conn, context))
            try:
                async for message in requests:
                    self._on_request(conn, message, delta)
                    if writer.done():
                        break
            finally:
                writer.cancel()
                self._disconnect(conn)

        return handle

    def _on_request(self, conn: _Connection, message: Any, delta: bool) -> None:
        if not conn.node:
            conn.node = message.node.id or f"anonymous-{conn.id}"
            conn.cluster = message.node.cluster
            log.info("xds.connect", node=conn.node, stream=conn.kind)
        request = _decode(message, delta, conn.fixed_type)
        for note in conn.state.receive(request, time.time()):
            name = short_name(note.type_url)
            if isinstance(note, Acked):
                self.metrics.acks.labels(name).inc()
                sent = conn.sent_at.get(note.type_url)
                if sent is not None:
                    self.metrics.push_latency.labels(name).observe(max(0.0, self.clock.now() - sent))
                self._settle(conn, note.type_url, None)
            elif isinstance(note, Nacked):
                self.metrics.nacks.labels(name).inc()
                log.warning("xds.nack", node=conn.node, type=name, version=note.version, error=note.error)
                self._settle(conn, note.type_url, note)
            elif isinstance(note, Ignored):
                log.debug("xds.ignored", node=conn.node, type=name, nonce=note.nonce, reason=note.reason)
            elif isinstance(note, Subscribed):
                conn.dirty.add(note.type_url)
                conn.wake.set()

    def _disconnect(self, conn: _Connection) -> None:
        self._connections.pop(conn.id, None)
        log.info("xds.disconnect", node=conn.node, stream=conn.kind)
        for completion in list(self._completions):
            completion.waiting.discard(conn.id)
            self._finish_if_empty(completion)

    # -- status ------------------------------------------------------------------------

    def status(self) -> list[NodeStatus]:
        """Every connected stream's per-type state. Safe to call from another thread
        (the agent runs handlers in an executor): it reads snapshots of the tables."""
        rows = []
        for conn in list(self._connections.values()):
            if not conn.node:
                continue
            types = tuple(
                TypeStatus(
                    type_url=url,
                    version_sent=ts.version_sent,
                    nonce_sent=ts.nonce_sent,
                    version_acked=ts.version_acked,
                    last_error=ts.last_error,
                    last_ack_time=ts.last_ack_time,
                    phase=ts.phase.value,
                )
                for url, ts in sorted(list(conn.state.types.items()), key=lambda i: (push_rank(i[0]), i[0]))
            )
            rows.append(NodeStatus(conn.node, conn.cluster, conn.kind, conn.connected_at, types))
        return rows


def _with(view: TypeView, extra: Mapping[str, CachedResource]) -> TypeView:
    merged = dict(extra)
    merged.update(view.resources)
    return replace(view, resources=merged, version=f"{view.version}+{len(extra)}")


def _decode(message: Any, delta: bool, fixed_type: str | None) -> Request:
    error = message.error_detail.message if message.HasField("error_detail") else None
    type_url = message.type_url or fixed_type or ""
    if delta:
        return Request(
            type_url=type_url,
            response_nonce=message.response_nonce,
            subscribe=tuple(message.resource_names_subscribe),
            unsubscribe=tuple(message.resource_names_unsubscribe),
            initial_versions=dict(message.initial_resource_versions),
            error=error,
        )
    return Request(
        type_url=type_url,
        response_nonce=message.response_nonce,
        version_info=message.version_info,
        resource_names=tuple(message.resource_names),
        error=error,
    )
