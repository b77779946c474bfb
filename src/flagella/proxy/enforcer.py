"""The xDS enforcer: an endpoint's HTTP and Kafka rules, published to the node Envoy.

Theory of operation
-------------------
`XdsEnforcer` implements the regeneration pipeline's `Enforcer` seam. On
``apply`` it computes, in the caller's thread and without I/O, the
endpoint's HTTP port policies for both directions (`direction_http_policy`,
peers from the agent's desired ipcache via `peer_sets`; the host override of
spec 3.3 is already in the resolved policy) and its Kafka port policies
(`direction_kafka_policy`), then hands a publish coroutine to the xDS server's
loop. That coroutine records the endpoint and replaces three resource sets
built from *every* endpoint's redirects:

- CDS: the ``ORIGINAL_DST`` cluster;
- LDS: the two transparent listeners (one filter chain per endpoint,
  direction and redirected port; a direction without chains has none). A
  Kafka port's chain is identity RBAC -> ext_proc -> tcp_proxy
  (`flagella.proxy.kafka_node`);
- ECDS: one RBAC `TypedExtensionConfig` per endpoint, direction and port
  (HTTP: the rules; Kafka: the peers' address sets, naming the identity).

The Kafka rules themselves never go to Envoy: the agent's ext_proc service
asks `kafka_rules` (on the xDS loop) per connection, and after each
publication ``on_kafka_change`` lets it re-apply the rules to the
connections already open, so a tightened policy holds from their next
request. On an egress chain the rules are the egress rules AND the ingress
Kafka rules, on that port, of every local endpoint with the destination's
identity for the source's identity (`kafka_intersection`): Envoy's upstream
is not redirected again, so the egress chain judges for the local broker
too, as the HTTP egress chain's second RBAC filter does. The processor
knows the peer's identity, not its address; endpoints of one identity get
one policy, so a remote destination of that identity is held to the rules
its own node applies anyway.

The completion resolves when every connected Envoy has ACKed the LDS and
ECDS versions that include this publication (or a later one), and fails on
a NACK (the reason is Envoy's error detail). An endpoint without L7
redirects completes at once. With redirects and no Envoy connected, the
completion stays pending (``waiting-for-enforcers``) until one connects and
ACKs, and fails after ``envoy_wait_s``: the kernel must never redirect into
nothing. `refresh_peers` (identity or ipcache change) rebuilds only the
ECDS resources: the listeners do not change.

`on_redirects` is called (on the xDS loop) the first time some endpoint has
L7 redirects: the agent starts Envoy then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2

from flagella.endpoint.model import Endpoint
from flagella.endpoint.regeneration import Completion
from flagella.policy.l7 import kafka_intersection
from flagella.policy.mapstate import L7Policy, MapState
from flagella.policy.resolver import EndpointPolicy
from flagella.proxy.kafka_envoy import ChainKey
from flagella.proxy.kafka_node import identity_filter_name, identity_rbac, kafka_node_chain
from flagella.proxy.l7policy import (
    DirectionHTTPPolicy,
    DirectionKafkaPolicy,
    direction_http_policy,
    direction_kafka_policy,
    port_redirects,
)
from flagella.proxy.listeners import (
    ACCESS_LOG_CLUSTER,
    ORIGINAL_DST_CLUSTER,
    ads_config_source,
    local_ingress_filter_name,
    original_dst_cluster,
    transparent_listener,
    typed_extension_config,
)
from flagella.proxy.rbac import PeerSet, http_rbac, local_ingress_rbac
from flagella.xds.cache import Message, subset_version
from flagella.xds.server import XdsServer
from flagella.xds.types import CLUSTER, EXTENSION_CONFIG, LISTENER

__all__ = ["INGRESS_LISTENER", "EGRESS_LISTENER", "ProxyPorts", "XdsEnforcer"]

log = structlog.get_logger("flagella.proxy")

INGRESS_LISTENER = "flagella-ingress"
EGRESS_LISTENER = "flagella-egress"


@dataclass(frozen=True)
class ProxyPorts:
    ingress: int = 15001
    egress: int = 15002


@dataclass(frozen=True)
class _Entry:
    """One endpoint's inputs (to recompute RBAC on a peer change) and outputs."""

    endpoint: Endpoint
    ingress_state: MapState
    egress_state: MapState
    ingress: DirectionHTTPPolicy
    egress: DirectionHTTPPolicy
    ingress_kafka: DirectionKafkaPolicy = DirectionKafkaPolicy()
    egress_kafka: DirectionKafkaPolicy = DirectionKafkaPolicy()

    @property
    def redirects(self) -> int:
        return (
            len(self.ingress.ports) + len(self.egress.ports)
            + len(self.ingress_kafka.ports) + len(self.egress_kafka.ports)
        )


class XdsEnforcer:
    name = "xds"

    def __init__(
        self,
        server: XdsServer,
        loop: asyncio.AbstractEventLoop | None,
        peers: Callable[[], Mapping[int, PeerSet]],
        ports: ProxyPorts = ProxyPorts(),
        legacy_host_allows_world: bool = False,
        envoy_wait_s: float = 60.0,
        on_redirects: Callable[[], None] | None = None,
        access_log: bool = True,
        on_kafka_change: Callable[[], None] | None = None,
    ) -> None:
        self.server = server
        self.loop = loop
        # Publications asked for before the xDS server's loop exists (agent restore).
        self._backlog: list[Coroutine[Any, Any, None]] = []
        self._backlog_lock = threading.Lock()
        self.ports = ports
        self._peers = peers
        # The host override of spec 3.3 (and world's, with legacy_host_allows_world) is
        # already in the resolved policy: the resolver gives the host's L3 allow the
        # wildcard L7 rule only with allow_localhost "always"; adding it here again would
        # overrule "policy". The argument stays for callers; the policy decides.
        del legacy_host_allows_world
        self._wildcards: tuple[int, ...] = ()
        self._envoy_wait_s = envoy_wait_s
        self._on_redirects = on_redirects
        self._on_kafka_change = on_kafka_change
        self._access_log = ACCESS_LOG_CLUSTER if access_log else None
        self._entries: dict[int, _Entry] = {}  # touched on the loop only
        self._published: dict[str, frozenset[str]] = {}  # type URL -> names last pushed
        self._ever_redirected = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> list[concurrent.futures.Future[None]]:
        """The xDS server runs on ``loop`` now: publish what waited for it. The futures
        are done once those publications are in the server's cache (they wait for no
        ACK: restore's applies completed at once)."""
        with self._backlog_lock:
            self.loop, backlog, self._backlog = loop, self._backlog, []
        return [asyncio.run_coroutine_threadsafe(coro, loop) for coro in backlog]

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        with self._backlog_lock:
            if self.loop is None:
                self._backlog.append(coro)
                return
            loop = self.loop
        asyncio.run_coroutine_threadsafe(coro, loop)

    # -- the Enforcer seam (any thread) ----------------------------------------------

    def apply(self, endpoint: Endpoint, revision: int, policy: EndpointPolicy) -> Completion:
        entry = self._entry(endpoint, policy.ingress, policy.egress, self._peers())
        if not entry.redirects:
            # Nothing for the kernel to redirect: dropping the chains can come later.
            self._run(self._publish(endpoint.id, None, None))
            return Completion.completed()
        if self.loop is None:
            # Agent restore, before the xDS server serves: no Envoy can ACK yet. The
            # kernel holds what Envoy ACKed before the restart (it never redirects
            # earlier) and Envoy keeps that config; the publication goes out at `bind`.
            self._run(self._publish(endpoint.id, entry, None))
            return Completion.completed()
        completion = Completion()
        self._run(self._publish(endpoint.id, entry, completion))
        return completion

    def remove(self, endpoint: Endpoint) -> None:
        self._run(self._publish(endpoint.id, None, None))

    def refresh_peers(self) -> None:
        """Identities or the ipcache changed: recompute every RBAC config (ECDS only)."""
        peers = self._peers()
        self._run(self._refresh(peers))

    def redirect_count(self) -> int:
        return sum(e.redirects for e in list(self._entries.values()))

    # -- pure parts -----------------------------------------------------------------------

    def _entry(
        self, endpoint: Endpoint, ingress: MapState, egress: MapState, peers: Mapping[int, PeerSet]
    ) -> _Entry:
        addrs = sorted(endpoint.addresses(), key=lambda a: (a.version, int(a)))
        return _Entry(
            endpoint,
            ingress,
            egress,
            direction_http_policy(endpoint.id, addrs, ingress, False, peers, self._wildcards),
            direction_http_policy(endpoint.id, addrs, egress, True, peers, ()),
            direction_kafka_policy(endpoint.id, addrs, ingress, False, self._wildcards),
            direction_kafka_policy(endpoint.id, addrs, egress, True, ()),
        )

    def kafka_rules(self, chain: ChainKey, identity: int) -> L7Policy | None:
        """The Kafka rules ``identity`` is held to on ``chain`` (on the xDS loop, where the
        entries live); None when the chain is gone or the kernel never redirects that peer."""
        entry = self._entries.get(chain.endpoint_id)
        if entry is None:
            return None
        for port in (entry.egress_kafka if chain.egress else entry.ingress_kafka).ports:
            if port.redirect.chain == chain:
                rules = port.rules_for(identity)
                if rules is None or not chain.egress:
                    return rules
                return self._and_local_ingress(rules, chain.port, entry.endpoint.identity, identity)
        return None

    def _and_local_ingress(self, rules: L7Policy, port: int, source: int, destination: int) -> L7Policy:
        """``rules`` AND the ingress Kafka rules of the local endpoints of ``destination``
        on ``port`` for ``source`` (an endpoint that does not redirect ``source`` there
        adds nothing: the kernel decides its L3/L4 on Envoy's upstream)."""
        for e in self._entries.values():
            if e.endpoint.identity != destination:
                continue
            for p in e.ingress_kafka.ports:
                if p.redirect.chain.port == port and (ingress := p.rules_for(source)) is not None:
                    rules = kafka_intersection(rules, ingress)
        return rules

    def endpoint_identity(self, endpoint_id: int) -> int | None:
        entry = self._entries.get(endpoint_id)
        return None if entry is None else entry.endpoint.identity

    def _listeners(self) -> dict[str, Message]:
        ecds = ads_config_source()
        entries = list(self._entries.values())
        ingress = [p.redirect for e in entries for p in e.ingress.ports]
        egress = [p.redirect for e in entries for p in e.egress.ports]
        kafka_in = [kafka_node_chain(p.redirect, ecds) for e in _by_id(entries) for p in e.ingress_kafka.ports]
        kafka_out = [kafka_node_chain(p.redirect, ecds) for e in _by_id(entries) for p in e.egress_kafka.ports]
        out: dict[str, Message] = {}
        # Envoy rejects a listener without filter chains: a direction without
        # redirects has no listener (nothing is redirected to its port).
        for name, port, redirects, kafka in (
            (INGRESS_LISTENER, self.ports.ingress, ingress, kafka_in),
            (EGRESS_LISTENER, self.ports.egress, egress, kafka_out),
        ):
            if redirects or kafka:
                out[name] = transparent_listener(
                    name, port, redirects, ecds, self._access_log, other_chains=kafka
                )
        return out

    def _filters(self) -> dict[str, Message]:
        out: dict[str, Message] = {}
        entries = list(self._entries.values())
        for e in entries:
            for p in (*e.ingress.ports, *e.egress.ports):
                out[p.redirect.filter_name] = typed_extension_config(p.redirect.filter_name, p.rbac)
        if any(e.ingress_kafka.ports or e.egress_kafka.ports for e in entries):
            peers = self._peers()
            for e in entries:
                for k in (*e.ingress_kafka.ports, *e.egress_kafka.ports):
                    name = identity_filter_name(k.redirect.chain)
                    out[name] = typed_extension_config(name, identity_rbac(k.redirect.chain, peers))
        local_by_port: dict[int, http_rbac_pb2.RBAC] = {}
        for e in entries:
            for p in e.egress.ports:
                port = p.redirect.port
                if port not in local_by_port:
                    local_by_port[port] = self._local_ingress(entries, port)
                name = local_ingress_filter_name(p.redirect)
                out[name] = typed_extension_config(name, local_by_port[port])
        return out

    def _local_ingress(self, entries: list[_Entry], port: int) -> http_rbac_pb2.RBAC:
        """Every local endpoint's ingress HTTP rules on ``port``, scoped to its addresses
        (the rules form, so that they can be scoped)."""
        peers = self._peers()
        targets = []
        for e in entries:
            if any(p.redirect.port == port for p in e.ingress.ports):
                rbac = http_rbac(
                    port_redirects(e.ingress_state, port), peers, False, self._wildcards,
                    matcher_threshold=1 << 30,
                )
                nets = [ipaddress.ip_network(a) for a in e.endpoint.addresses()]
                targets.append((nets, rbac))
        return local_ingress_rbac(targets)

    # -- on the xDS loop ----------------------------------------------------------------

    async def _publish(self, ep_id: int, entry: _Entry | None, completion: Completion | None) -> None:
        try:
            if entry is None or not entry.redirects:
                self._entries.pop(ep_id, None)
            else:
                self._entries[ep_id] = entry
                if not self._ever_redirected:
                    self._ever_redirected = True
                    if self._on_redirects is not None:
                        self._on_redirects()
            # The filter configs first: a new chain finds its config already there.
            self._push(EXTENSION_CONFIG, self._filters())
            self._push(CLUSTER, {ORIGINAL_DST_CLUSTER: original_dst_cluster()})
            self._push(LISTENER, self._listeners())
            self._kafka_changed()
            if completion is None:
                return
            error = await self._await_acks()
        except Exception as exc:  # the completion must learn of every failure
            log.exception("xds-publish-failed", endpoint=ep_id)
            error = f"{type(exc).__name__}: {exc}"
        if completion is not None:
            if error is None:
                completion.complete()
            else:
                completion.fail(error)

    async def _refresh(self, peers: Mapping[int, PeerSet]) -> None:
        self._entries = {
            i: self._entry(e.endpoint, e.ingress_state, e.egress_state, peers) for i, e in self._entries.items()
        }
        self._push(EXTENSION_CONFIG, self._filters())
        self._kafka_changed()

    def _kafka_changed(self) -> None:
        if self._on_kafka_change is not None:
            try:
                self._on_kafka_change()
            except Exception:  # never let a listener break the publication
                log.exception("kafka-rules-refresh-failed")

    def _push(self, type_url: str, resources: Mapping[str, Message]) -> None:
        # The server's own completion (per change) is not ours: `_await_acks` checks
        # the node's ACKed versions, which also covers an Envoy that connects later.
        self.server.set_resources(type_url, resources).add_done_callback(_retrieve)
        self._published[type_url] = frozenset(resources)

    async def _await_acks(self) -> str | None:
        """Wait until every connected node ACKed the current listeners and filters;
        return the reason when one NACKs them or none connects in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._envoy_wait_s
        while True:
            state = self.sync_state()
            if state == "":
                return None
            if state.startswith("nack"):
                return state
            if loop.time() > deadline:
                return state
            await asyncio.sleep(0.02)

    def sync_state(self) -> str:
        """"" when every connected node ACKed the current LDS and ECDS versions,
        else why not ("no Envoy connected", "nack: ...", "waiting for ...")."""
        rows = [r for r in self.server.status() if any(t.type_url == LISTENER for t in r.types)]
        if not rows:
            return "no Envoy connected to the xDS server"
        waiting = []
        for row in rows:
            types = {t.type_url: t for t in row.types}
            for url in (LISTENER, EXTENSION_CONFIG):
                view = self.server.cache.view(row.node, url)
                # ECDS is asked for by name: what counts is the filters published here
                # (the view may hold others: an Istio sidecar's, which this Envoy never asks for).
                want = view.version if url == LISTENER else subset_version(view, self._published.get(url, ()))
                t = types.get(url)
                if t is None:
                    if url == EXTENSION_CONFIG and not self._filters():
                        continue
                    waiting.append(f"{row.node} has not subscribed to {url.rsplit('.', 1)[-1]}")
                    continue
                if t.phase == "nacked" and t.version_sent == want:
                    return f"nack from {row.node}: {t.last_error}"
                if t.version_acked != want:
                    waiting.append(f"{row.node} has not ACKed {url.rsplit('.', 1)[-1]} {want[:12]}")
        return "; ".join(waiting)


def _by_id(entries: list[_Entry]) -> list[_Entry]:
    return sorted(entries, key=lambda e: e.endpoint.id)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
