"""The agent's Istio sidecar mode: the sidecar enforcer on the agent's xDS server.

Theory of operation
-------------------
`IstioSidecars` composes `flagella.istio` for the agent (settings group
``istio:``, off by default). It is built before the agent core, because its
`SidecarEnforcer` runs in the regeneration pipeline's kernel stage (see
that module for why not before the kernel), and is started on the agent's
loop with the API:

- the xDS server is the node proxy's when the proxy is on (one socket, one
  gRPC server: the sidecars' ``ExtensionConfigDiscoveryService`` streams
  next to the node Envoy's ADS), else a server of its own on the same
  socket path (``proxy.xds_socket``, default ``<state_dir>/xds.sock``);
- the sidecars' Kafka chains call the `KafkaExtProcService` on that server:
  the node proxy's (the agent adds `SidecarEnforcer.kafka_rules` to its
  lookups), else one of our own, registered on our server; either way the
  enforcer refreshes it after every publication;
- the core's ipcache listener hands the peers' address sets and labels to
  the enforcer (`set_ipcache`), so a new pod or a relabel republishes the
  meshed workloads' configs;
- a watch task logs, once per node id, every connected sidecar that no
  meshed endpoint matches (it has the deny-all base config);
- `ensure_init_policy` puts the ``reserved:init`` policy built from
  ``istio.init_policy`` into the policy repository, like an import (a
  document equal to the one there already changes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from flagella.agent.core import AgentCore
from flagella.agent.settings import AgentSettings
from flagella.datapath.port import IPNetwork
from flagella.istio.enforcer import SidecarEnforcer
from flagella.istio.initpolicy import init_policy
from flagella.policy.labels import LabelSet
from flagella.policy.mapstate import L7Policy
from flagella.proxy.kafka_envoy import ChainKey, KafkaExtProcService
from flagella.proxy.rbac import peer_sets
from flagella.xds.server import XdsServer, XdsSettings
from flagella.xds.status import XdsMetrics

if TYPE_CHECKING:
    from flagella.agent.proxy import NodeProxy

__all__ = ["IstioSidecars"]

log = structlog.get_logger("flagella.agent")

#: Seconds between two looks for sidecars that match no endpoint.
WATCH_INTERVAL_S = 2.0


class IstioSidecars:
    def __init__(
        self, settings: AgentSettings, server: XdsServer | None = None, kafka: KafkaExtProcService | None = None
    ) -> None:
        """``server``: the node proxy's xDS server, ``kafka`` the Kafka service on it (the
        caller makes it ask `SidecarEnforcer.kafka_rules` too); None builds both (the
        server is started by `start`)."""
        self.settings = settings
        self.own_server = server is None
        self.kafka = kafka or KafkaExtProcService(self._kafka_rules)
        self.server = server or XdsServer(
            XdsSettings(unix_socket=Path(settings.xds_socket_path)), metrics=XdsMetrics(None),
            services=[self.kafka.register],
        )
        self.enforcer = SidecarEnforcer(
            self.server, settings.istio, settings.istio.socket_in_pod, on_kafka_change=self.kafka.refresh
        )
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    def for_agent(cls, settings: AgentSettings, proxy: NodeProxy | None) -> IstioSidecars:
        """On the node proxy's server and Kafka service when it is on (which then asks
        this enforcer for the sidecars' chains), else on servers of our own."""
        if proxy is None:
            return cls(settings)
        istio = cls(settings, proxy.server, proxy.kafka)
        proxy.add_kafka_rules(istio.enforcer.kafka_rules, istio.enforcer.endpoint_identity)
        return istio

    def _kafka_rules(self, chain: ChainKey, identity: int) -> L7Policy | None:
        return self.enforcer.kafka_rules(chain, identity)

    def set_ipcache(self, desired: Mapping[IPNetwork, int], identities: Mapping[int, LabelSet]) -> None:
        """The core's ipcache listener (with the engine's identity labels)."""
        wanted = set(desired.values())
        self.enforcer.set_peers(
            peer_sets(desired),
            {i: labels for i, labels in identities.items() if i in wanted},
        )

    def ensure_init_policy(self, core: AgentCore) -> int | None:
        """Import the init policy unless the repository holds it as it is; its revision."""
        s = self.settings.istio.init_policy
        if not s.enabled:
            return None
        doc = init_policy(s)
        meta = doc["metadata"]
        for (_, ns, name), policy in core.engine.policies.items():
            if (ns, name) == (meta["namespace"], meta["name"]) and policy.source == doc:
                return None
        revision = core.import_policies([doc], ["istio.init_policy (settings)"])
        log.info("istio-init-policy-imported", name=meta["name"], namespace=meta["namespace"], revision=revision)
        return revision

    async def start(self) -> None:
        """On the agent's loop, before the node proxy (if any) starts the server: the
        restored endpoints' configs are in the cache before the first sidecar asks."""
        self.enforcer.bind()
        await asyncio.sleep(0)  # the backlog's publications run up to their first await
        if self.own_server:
            Path(self.settings.xds_socket_path).parent.mkdir(parents=True, exist_ok=True)
            await self.server.start()
        self._watch = asyncio.get_running_loop().create_task(self._watch_nodes())
        log.info("istio-sidecars-served", socket=str(self.server.settings.unix_socket))

    async def _watch_nodes(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                self.enforcer.check_nodes()
            except Exception:  # a bug must not end the watch
                log.exception("istio-watch-failed")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.own_server:
            await self.server.stop()
