"""The agent's node proxy: xDS server, xDS enforcer, one supervised Envoy, L7 records.

Theory of operation
-------------------
`NodeProxy` composes `flagella.xds` and `flagella.proxy` for the agent
(settings group ``proxy:``). It is built before the agent core, because the
`XdsEnforcer` is one of the core's pipeline enforcers (the first stage:
the kernel applies an endpoint's policy only after Envoy ACKed it), and is
started on the agent's loop with the API:

- the `XdsServer` listens on the xDS socket (mode 0660) and serves, on the
  same gRPC server, the `AccessLogServicer` that Envoy's HTTP chains log to
  and the `KafkaExtProcService` that Envoy's Kafka chains call (both
  through cluster ``flagella-xds`` of the bootstrap). The Kafka service asks
  the enforcer for a peer's rules per connection and is refreshed after
  every publication (open connections get the new rules). Chains the
  enforcer does not know go to the lookups added with `add_kafka_rules`
  (the Istio sidecars' chains, `flagella.agent.istio`);
- one Envoy runs under an `EnvoySupervisor` (restart with backoff; a
  restarted Envoy gets the whole config again over ADS). It starts at agent
  start with ``start_at_agent_start``, else when the enforcer first sees an
  HTTP redirect;
- the core's ipcache listener hands every desired ipcache to the enforcer
  (ECDS-only updates of the peer sets) and to the access-log identity
  lookup;
- each L7 record (an HTTP access-log entry, a judged Kafka request) becomes
  a monitor event (``type: l7``, with the `format_l7` / `format_kafka` line)
  and counts in ``flagella_policy_l7_total{rule, proxy_type}``: every
  request is ``received``, then ``forwarded``, ``denied`` (Envoy's RBAC
  answered 403, or the Kafka processor answered an authorization error) or
  ``parse_errors`` (an HTTP record with verdict Error, entries that name no
  chain, unparsable Kafka frames). A denied request is also an L7 drop of its
  direction (`l7_drops`): ``bpf metrics list`` and ``flagella_drop_count``
  show it with reason ``Policy denied (L7)`` next to the kernel's drops.

Envoy is left running when the agent stops: it keeps enforcing its last
config, and its ADS stream reconnects to the next agent, which resyncs it.
That agent *adopts* the running Envoy (its admin port answers with our node
id) instead of starting a second one on the same base id and ports, and
watches it: when it goes away, the supervisor starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog
from envoy.service.accesslog.v3 import als_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from flagella.agent.settings import AgentSettings
from flagella.policy.mapstate import L7Policy
from flagella.proxy.accesslog import AccessLogServicer, L7Record, format_l7
from flagella.proxy.enforcer import ProxyPorts, XdsEnforcer
from flagella.proxy.envoy import EnvoyProcess, EnvoySupervisor, bootstrap
from flagella.proxy.kafka import KafkaAccessRecord, default_catalog
from flagella.proxy.kafka_envoy import ChainKey, KafkaExtProcService, KafkaRulesLookup, Peer
from flagella.proxy.rbac import PeerSet, peer_sets
from flagella.xds.server import XdsServer, XdsSettings
from flagella.xds.status import XdsMetrics

__all__ = ["L7_DROP_REASON", "L7_RULES", "NodeProxy", "format_kafka", "kafka_event"]

log = structlog.get_logger("flagella.agent")

L7_RULES = ("received", "forwarded", "denied", "parse_errors")
PROXY_TYPES = ("http", "kafka")
L7_DROP_REASON = "Policy denied (L7)"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NodeProxy(Collector):
    def __init__(
        self,
        settings: AgentSettings,
        registry: CollectorRegistry | None = None,
        node_id: str = "flagella-node",
    ) -> None:
        self.settings = settings
        p = settings.proxy
        self.node_id = node_id
        self.socket = Path(settings.xds_socket_path)
        self.accesslog = AccessLogServicer(self._record, self._identity_of)
        self.kafka = KafkaExtProcService(
            self._kafka_rules, on_peer_record=self._kafka_record,
        )
        #: Further Kafka rules lookups, asked in order for chains the enforcer has not.
        self._kafka_lookups: list[tuple[KafkaRulesLookup, Callable[[int], int | None]]] = []
        self.server = XdsServer(
            XdsSettings(unix_socket=self.socket),
            metrics=XdsMetrics(registry),
            services=[
                lambda s: als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.accesslog, s),
                self.kafka.register,
            ],
        )
        self._peers: Mapping[int, PeerSet] = {}
        self._ipcache: list[tuple[IPNetwork, int]] = []
        self.enforcer = XdsEnforcer(
            self.server, None, lambda: self._peers, ProxyPorts(p.ingress_port, p.egress_port),
            settings.policy.legacy_host_allows_world, p.envoy_wait_s, on_redirects=self._want_envoy,
            on_kafka_change=self.kafka.refresh,
        )
        self.supervisor = EnvoySupervisor(self._envoy)
        #: (proxy_type, rule) -> requests.
        self.l7_counts: Counter[tuple[str, str]] = Counter()
        self._l7_denied: Counter[str] = Counter()  # by direction, INGRESS / EGRESS
        #: Where L7 records go besides the metric (the agent's monitor subscribers).
        self.sinks: list[Callable[[dict[str, Any]], None]] = []
        self._envoy_task: asyncio.Task[None] | None = None
        self.adopted = False

    # -- wiring --------------------------------------------------------------------

    def set_ipcache(self, desired: Mapping[IPNetwork, int]) -> None:
        """The core's ipcache listener: new peer sets, pushed as ECDS updates."""
        self._ipcache = sorted(desired.items(), key=lambda kv: -kv[0].prefixlen)
        self._peers = peer_sets(desired)
        self.enforcer.refresh_peers()

    def _identity_of(self, addr: IPAddress) -> int:
        for net, ident in list(self._ipcache):
            if net.version == addr.version and addr in net:
                return ident
        return 2  # world

    def _record(self, rec: L7Record) -> None:
        self.l7_counts["http", "received"] += 1
        rule = {"Denied": "denied", "Error": "parse_errors"}.get(rec.verdict, "forwarded")
        self.l7_counts["http", rule] += 1
        if rule == "denied":
            self._l7_denied["EGRESS" if rec.egress else "INGRESS"] += 1
        event = rec.to_json()
        event["line"] = format_l7(rec)
        self._emit(event)

    def add_kafka_rules(self, lookup: KafkaRulesLookup, endpoint_identity: Callable[[int], int | None]) -> None:
        """Serve another enforcer's Kafka chains (and name their endpoints' identities)."""
        self._kafka_lookups.append((lookup, endpoint_identity))

    def _kafka_rules(self, chain: ChainKey, identity: int) -> L7Policy | None:
        rules = self.enforcer.kafka_rules(chain, identity)
        for lookup, _ in self._kafka_lookups:
            if rules is not None:
                break
            rules = lookup(chain, identity)
        return rules

    def _endpoint_identity(self, endpoint_id: int) -> int | None:
        local = self.enforcer.endpoint_identity(endpoint_id)
        for _, lookup in self._kafka_lookups:
            if local is not None:
                break
            local = lookup(endpoint_id)
        return local

    def _kafka_record(self, peer: Peer, rec: KafkaAccessRecord) -> None:
        self.l7_counts["kafka", "received"] += 1
        self.l7_counts["kafka", rec.verdict] += 1
        if rec.verdict == "denied":
            self._l7_denied["EGRESS" if peer.chain.egress else "INGRESS"] += 1
        local = self._endpoint_identity(peer.chain.endpoint_id)
        self._emit(kafka_event(peer, rec, 0 if local is None else local))

    def _emit(self, event: dict[str, Any]) -> None:
        for sink in list(self.sinks):
            sink(event)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "flagella_policy_l7", "L7 requests seen by the node proxy", labels=["rule", "proxy_type"]
        )
        counts = dict(self.l7_counts)
        counts["http", "parse_errors"] = counts.get(("http", "parse_errors"), 0) + self.accesslog.errors
        counts["kafka", "parse_errors"] = self.kafka.unparsable
        for proxy_type in PROXY_TYPES:
            for rule in L7_RULES:
                family.add_metric([rule, proxy_type], counts.get((proxy_type, rule), 0))
        yield family

    def l7_drops(self) -> dict[tuple[str, str], int]:
        """Denied requests as drop totals: (reason, direction) -> count."""
        return {(L7_DROP_REASON, d): n for d, n in sorted(self._l7_denied.items())}

    # -- Envoy ------------------------------------------------------------------------

    def _envoy(self) -> EnvoyProcess:
        p = self.settings.proxy
        workdir = Path(self.settings.state_dir) / "envoy"
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return EnvoyProcess(
            bootstrap(self.node_id, self.socket, p.admin_port), p.envoy_base_id, workdir=workdir, detached=True
        )

    def _want_envoy(self) -> None:
        """On the xDS loop: the first HTTP redirect appeared."""
        if self._envoy_task is None and self.supervisor.process is None:
            self._envoy_task = asyncio.get_running_loop().create_task(self._start_envoy())

    def _running_envoy(self) -> bool:
        """An Envoy of ours (a previous agent's) answers on the admin port."""
        url = f"http://127.0.0.1:{self.settings.proxy.admin_port}/server_info"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                info = json.loads(r.read())
        except (OSError, ValueError):
            return False
        return bool(info.get("node", {}).get("id") == self.node_id)

    async def _start_envoy(self) -> None:
        if await asyncio.to_thread(self._running_envoy):
            self.adopted = True
            log.info("envoy-adopted", admin_port=self.settings.proxy.admin_port)
            while await asyncio.to_thread(self._running_envoy):
                await asyncio.sleep(0.5)
            self.adopted = False
            log.warning("envoy-adopted-exited")
        delay = 0.5
        while True:
            try:
                await self.supervisor.start()
                log.info("envoy-started", admin_port=self.settings.proxy.admin_port)
                return
            except Exception as exc:  # endpoints show "no Envoy connected" meanwhile
                log.error("envoy-start-failed", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- lifecycle (on the agent's loop) ---------------------------------------------------

    async def start(self) -> None:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        # Restore's publications reach the cache before the socket listens, so a
        # reconnecting Envoy is never answered with less than every restored endpoint.
        restored = self.enforcer.bind(asyncio.get_running_loop())
        await asyncio.gather(*(asyncio.wrap_future(f) for f in restored))
        await self.server.start()
        if self.settings.proxy.start_at_agent_start or await asyncio.to_thread(self._running_envoy):
            self._want_envoy()

    async def stop(self, stop_envoy: bool = False) -> None:
        """Stop serving xDS; Envoy keeps its last config unless ``stop_envoy``."""
        if self._envoy_task is not None and not self._envoy_task.done():
            self._envoy_task.cancel()  # adopting or (re)trying a start
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._envoy_task
        if stop_envoy:
            await self.supervisor.stop()
        else:
            await self.supervisor.detach()
        await self.server.stop()


def kafka_event(peer: Peer, rec: KafkaAccessRecord, local_identity: int) -> dict[str, Any]:
    """A judged Kafka request as a monitor event (``type: l7``, ``proxy_type: kafka``)."""
    egress = peer.chain.egress
    src, dst = (local_identity, peer.identity) if egress else (peer.identity, local_identity)
    event: dict[str, Any] = {
        "type": "l7",
        "proxy_type": "kafka",
        "endpoint": peer.chain.endpoint_id,
        "direction": "egress" if egress else "ingress",
        "port": peer.chain.port,
        "src_identity": src,
        "dst_identity": dst,
        "api_key": rec.api_key,
        "api_version": rec.api_version,
        "correlation_id": rec.correlation_id,
        "client_id": rec.client_id,
        "topics": list(rec.topics),
        "refused_topics": list(rec.refused_topics),
        "verdict": "Denied" if rec.verdict == "denied" else "Forwarded",
    }
    event["line"] = format_kafka(event)
    return event


def format_kafka(ev: Mapping[str, Any]) -> str:
    """Cilium's monitor line for a Kafka request, with the refused Metadata topics."""
    arrow = "->" if ev["direction"] == "egress" else "<-"
    topics = ",".join(ev["topics"]) or "-"
    line = (
        f"{arrow} endpoint {ev['endpoint']} {ev['direction']} Request kafka port {ev['port']}, "
        f"identity {ev['src_identity']}->{ev['dst_identity']}, verdict {ev['verdict']} "
        f"apiKey {ev['api_key']} ({_api_name(ev['api_key'])}) apiVersion {ev['api_version']} "
        f"correlationID {ev['correlation_id']} clientID {ev['client_id'] or '-'} topic {topics}"
    )
    if ev.get("refused_topics"):
        line += f" (refused: {','.join(ev['refused_topics'])})"
    return line



def _api_name(api_key: int) -> str:
    spec = default_catalog().requests.get(api_key)
    return spec.name.removesuffix("Request") if spec is not None else "?"
