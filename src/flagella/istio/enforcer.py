"""The sidecar enforcer: each meshed endpoint's policy, published to its Istio sidecar.

Theory of operation
-------------------
`SidecarEnforcer` implements the regeneration pipeline's `Enforcer` seam
for endpoints with the ``istio_sidecar`` flag. The agent hands every
enforcer the same `SidecarPolicy` for such an endpoint (`sidecar.kernel_policy`:
the kernel gets no HTTP redirect, the untouched ingress rides along as
``sidecar_ingress``). ``apply`` builds, in the caller's thread and without
I/O, the workload's resources from that ingress, the peers' address sets
and the identities' labels (the agent's ipcache listener hands both in
with `set_peers`):

- ``flagella.rbac``: the HTTP RBAC config for all inbound ports (`workload_rbac`);
- for each Kafka port, the network RBAC that names the peer (SPIFFE
  principals) and the network ext_proc config (`workload_kafka`).

It then has `IstioPublisher` set them, on the xDS server's loop, under
every node id the endpoint's sidecar may send. The completion is the
sidecar's ACK: it resolves when every connected sidecar of the workload
ACKed the new resources, at once when none is connected (a sidecar that
connects later gets them on its first request; until then its
``default_config`` denies), and fails on a NACK or after the server's
``ack_timeout``. Publications asked for before `bind` (the agent's restore)
complete at once and are published when the agent binds the enforcer,
which it does before the server accepts its first stream: a sidecar that
reconnects to a restarted agent never sees the deny-all base in between. The pipeline runs this enforcer in the kernel's stage, not
before it: a sidecar runs inside a pod its owner controls, and a sidecar
that never ACKs must not hold back the kernel's L3/L4 policy (it only keeps
the endpoint ``not-ready``, with the reason).

An endpoint without the flag completes at once (and loses what was
published for it, should it have had the flag before). ``remove`` puts the
pod's node ids back to deny-all. A peer change (`set_peers`) republishes
every meshed workload: ECDS only, no completion.

*Kafka rules.* The sidecar's Kafka chains call the agent's
`KafkaExtProcService` (the node proxy's, or `flagella.agent.istio`'s own),
whose stat prefix names the chain ``(endpoint, ingress, port)`` as on the
node proxy. `kafka_rules` answers it from the published workloads (on the
xDS loop, where they live): the workload's ingress Kafka rules on that port
for the peer identity (the host gets every request, as for HTTP), None
(close) for a chain no meshed workload has. After every publication,
removal and peer change ``on_kafka_change`` re-applies the rules to the
open connections (the service's ``refresh``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2

from flagella.endpoint.model import Endpoint
from flagella.endpoint.regeneration import Completion
from flagella.istio.publisher import IstioPublisher
from flagella.istio.sidecar import SidecarPolicy
from flagella.istio.workload import IstioSettings, workload_kafka, workload_rbac
from flagella.policy.labels import LabelSet
from flagella.policy.mapstate import L7Policy, MapState
from flagella.policy.resolver import EndpointPolicy
from flagella.proxy.kafka_envoy import ChainKey
from flagella.proxy.l7policy import DirectionKafkaPolicy, direction_kafka_policy
from flagella.proxy.rbac import PeerSet
from flagella.xds.cache import Message
from flagella.xds.server import XdsError, XdsServer

__all__ = ["HOST_IDENTITY", "SidecarEnforcer"]

log = structlog.get_logger("flagella.istio")

#: The host gets every request, as on the node proxy (spec 3.3: its health checks).
HOST_IDENTITY = 1


@dataclass(frozen=True)
class _Workload:
    endpoint: Endpoint
    ingress: MapState
    #: The ingress Kafka rules per port and peer (what `kafka_rules` answers from).
    kafka: DirectionKafkaPolicy = DirectionKafkaPolicy()


@dataclass(frozen=True)
class _Peers:
    addresses: Mapping[int, PeerSet]
    labels: Mapping[int, LabelSet]


class SidecarEnforcer:
    name = "istio"

    def __init__(
        self,
        server: XdsServer,
        settings: IstioSettings,
        socket_in_pod: str,
        on_kafka_change: Callable[[], None] | None = None,
    ) -> None:
        """``socket_in_pod``: the agent's socket as the sidecar sees it (the Kafka filters'
        target); ``on_kafka_change``: called on the loop when `kafka_rules` may answer
        differently (the Kafka service's ``refresh``)."""
        self.server = server
        self.on_kafka_change = on_kafka_change
        self.settings = settings
        self.socket_in_pod = socket_in_pod
        self.publisher: IstioPublisher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._backlog: list[Coroutine[Any, Any, None]] = []
        self._peers = _Peers({}, {})
        self._workloads: dict[int, _Workload] = {}  # touched on the loop only

    # -- wiring ---------------------------------------------------------------------------

    def bind(self) -> None:
        """On the xDS server's loop, before the server serves: publish what waited for it
        (the publications start in tasks that run before the caller's next await)."""
        loop = asyncio.get_running_loop()
        self.publisher = IstioPublisher(self.server)
        with self._lock:
            self._loop, backlog, self._backlog = loop, self._backlog, []
        for coro in backlog:
            loop.create_task(coro)

    def _run(self, coro: Coroutine[Any, Any, None]) -> bool:
        """Run ``coro`` on the loop; False when it waits for `bind` (no server yet)."""
        with self._lock:
            if self._loop is None:
                self._backlog.append(coro)
                return False
            loop = self._loop
        asyncio.run_coroutine_threadsafe(coro, loop)
        return True

    def set_peers(self, addresses: Mapping[int, PeerSet], labels: Mapping[int, LabelSet]) -> None:
        """Identities or addresses changed (any thread): republish every meshed workload."""
        self._peers = _Peers(addresses, labels)
        self._run(self._refresh())

    # -- the Enforcer seam (any thread) ------------------------------------------------------

    def apply(self, endpoint: Endpoint, revision: int, policy: EndpointPolicy) -> Completion:
        if not endpoint.istio_sidecar or not isinstance(policy, SidecarPolicy) or policy.sidecar_ingress is None:
            self._run(self._unpublish(endpoint.id))
            return Completion.completed()
        addrs = sorted(endpoint.addresses(), key=lambda a: (a.version, int(a)))
        workload = _Workload(
            endpoint, policy.sidecar_ingress,
            direction_kafka_policy(endpoint.id, addrs, policy.sidecar_ingress, False, (HOST_IDENTITY,)),
        )
        resources = self.resources(workload, self._peers)  # pure, before the loop: errors fail this apply
        completion = Completion()
        if not self._run(self._publish(workload, resources, completion)):
            # No server yet (agent restore): no sidecar can be connected, and the server
            # will hold the config before it serves the first one.
            return Completion.completed()
        return completion

    def remove(self, endpoint: Endpoint) -> None:
        self._run(self._unpublish(endpoint.id))

    def kafka_rules(self, chain: ChainKey, identity: int) -> L7Policy | None:
        """The Kafka rules ``identity`` is held to on a sidecar's chain (on the xDS loop);
        None when no meshed workload has that chain."""
        workload = self._workloads.get(chain.endpoint_id)
        if workload is None or chain.egress:
            return None
        for port in workload.kafka.ports:
            if port.redirect.chain == chain:
                return port.rules_for(identity)
        return None

    def endpoint_identity(self, endpoint_id: int) -> int | None:
        workload = self._workloads.get(endpoint_id)
        return None if workload is None else workload.endpoint.identity

    def _kafka_changed(self) -> None:
        if self.on_kafka_change is not None:
            try:
                self.on_kafka_change()
            except Exception:  # never let a listener break the publication
                log.exception("istio-kafka-refresh-failed")

    # -- pure part ----------------------------------------------------------------------------

    def resources(self, workload: _Workload, peers: _Peers) -> tuple[http_rbac_pb2.RBAC, dict[str, Message]]:
        """The HTTP config and the Kafka resources of one workload."""
        http = workload_rbac(workload.ingress, peers.addresses, peers.labels, self.settings, (HOST_IDENTITY,))
        kafka = workload_kafka(
            workload.endpoint.id, workload.ingress, peers.addresses, peers.labels, self.settings, self.socket_in_pod
        )
        return http, dict(kafka)

    # -- on the xDS loop -------------------------------------------------------------------

    async def _publish(
        self, workload: _Workload, resources: tuple[http_rbac_pb2.RBAC, dict[str, Message]], completion: Completion
    ) -> None:
        ep = workload.endpoint
        error: str | None = None
        try:
            assert self.publisher is not None
            self._workloads[ep.id] = workload
            self._kafka_changed()
            acked = self.publisher.publish(ep.name, ep.namespace, ep.addresses(), *resources)
            await acked
        except XdsError as exc:
            error = f"sidecar of {ep.namespace}/{ep.name}: {exc}"
        except Exception as exc:  # the completion must learn of every failure
            log.exception("istio-publish-failed", endpoint=ep.id)
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            completion.complete()
        else:
            completion.fail(error)

    async def _unpublish(self, ep_id: int) -> None:
        workload = self._workloads.pop(ep_id, None)
        if workload is not None:
            self._kafka_changed()
        if workload is not None and self.publisher is not None:
            self.publisher.remove(workload.endpoint.name, workload.endpoint.namespace).add_done_callback(_retrieve)

    async def _refresh(self) -> None:
        if self.publisher is None:
            return
        peers = self._peers
        for workload in list(self._workloads.values()):
            ep = workload.endpoint
            try:
                resources = self.resources(workload, peers)
            except Exception:
                log.exception("istio-refresh-failed", endpoint=ep.id)
                continue
            self.publisher.publish(ep.name, ep.namespace, ep.addresses(), *resources).add_done_callback(_retrieve)
        self._kafka_changed()

    def check_nodes(self) -> list[str]:
        """Connected sidecars that match no meshed endpoint (logged once each; they have deny-all)."""
        return self.publisher.check_nodes() if self.publisher is not None else []


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
