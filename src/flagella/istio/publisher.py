"""Glue: per-workload ECDS configs on a running `XdsServer`.

Theory of operation. The ECDS resource `FILTER_NAME` of the cache's base
layer is deny-all (the base layer survives the node proxy replacing its
global filter set on the same server), so a sidecar that no workload was
published for (an unknown pod, a node id the agent cannot map) gets
denied, like one before its first config. A published workload gets its
configs (HTTP RBAC, and the Kafka filters of its Kafka ports) as per-node
resources under every node id its sidecar may send (one per pod address),
which replace the base one for that node only. `publish` returns the server's completion: it
resolves once every connected sidecar of the workload ACKed the config.
`check_nodes` logs connected sidecars that match no published workload
(and nodes that are not sidecars at all), once per node id.

The server keeps its cache when Flagella's agent loses a sidecar's stream;
Envoy keeps the last ACKed config, so an agent outage leaves the last
policy in force, and a restarted agent republishes before it serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import structlog
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2

from flagella.errors import InputError
from flagella.istio.workload import (
    FILTER_NAME,
    IPAddress,
    deny_all_config,
    ecds_resource,
    node_id,
    parse_node,
)
from flagella.xds.cache import Message
from flagella.xds.server import XdsServer
from flagella.xds.types import EXTENSION_CONFIG

log = structlog.get_logger("flagella.istio")


class IstioPublisher:
    def __init__(self, server: XdsServer) -> None:
        self.server = server
        self._nodes: dict[tuple[str, str], tuple[str, ...]] = {}
        self._reported: set[str] = set()
        server.set_base(EXTENSION_CONFIG, {FILTER_NAME: ecds_resource(deny_all_config())})

    def publish(
        self, pod: str, namespace: str, addresses: Iterable[IPAddress], config: http_rbac_pb2.RBAC,
        extra: Mapping[str, Message] | None = None,
    ) -> asyncio.Future[list[None]]:
        """Set the workload's resources: ``config`` as `FILTER_NAME`, and ``extra``
        (the Kafka filters); a later publish replaces them all."""
        resource: dict[str, Message] = {**(extra or {}), FILTER_NAME: ecds_resource(config)}
        ids = tuple(sorted(node_id(pod, namespace, a) for a in addresses))
        for stale in set(self._nodes.get((namespace, pod), ())) - set(ids):
            self.server.cache.forget_node(stale)
        self._nodes[(namespace, pod)] = ids
        return asyncio.gather(*(self.server.set_resources(EXTENSION_CONFIG, resource, node=n) for n in ids))

    def node_ids(self, pod: str, namespace: str) -> tuple[str, ...]:
        return self._nodes.get((namespace, pod), ())

    def remove(self, pod: str, namespace: str) -> asyncio.Future[list[None]]:
        """Back to deny-all for the pod's node ids (a deleted pod's address may be reused)."""
        ids = self._nodes.pop((namespace, pod), ())
        return asyncio.gather(
            *(self.server.set_resources(EXTENSION_CONFIG, {}, node=n) for n in ids)
        )

    def check_nodes(self) -> list[str]:
        """Connected ECDS nodes without a published workload; each is logged once."""
        known = {n for ids in self._nodes.values() for n in ids}
        unknown = []
        for row in self.server.status():
            if row.node in known or not any(t.type_url == EXTENSION_CONFIG for t in row.types):
                continue
            unknown.append(row.node)
            if row.node in self._reported:
                continue
            self._reported.add(row.node)
            try:
                node = parse_node(row.node)
            except InputError as e:
                log.warning("istio.node_not_a_sidecar", node=row.node, error=str(e), config="deny-all")
                continue
            log.warning("istio.unknown_workload", node=row.node, pod=node.pod, namespace=node.namespace,
                        config="deny-all")
        return sorted(set(unknown))


__all__ = ["IstioPublisher"]
