"""An in-process xDS client over a real unix socket, and small resource builders."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.service.discovery.v3 import discovery_pb2 as d
from google.rpc import status_pb2

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


def cluster(name: str, timeout_s: int = 1) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.seconds = timeout_s
    return c


def rbac_filter(name: str, allow_path: str) -> extension_pb2.TypedExtensionConfig:
    """An RBAC HTTP filter config allowing one path prefix, for ECDS."""
    from envoy.config.rbac.v3 import rbac_pb2 as rbac_cfg

    policy = rbac_cfg.Policy()
    perm = policy.permissions.add()
    perm.url_path.path.prefix = allow_path
    policy.principals.add().any = True
    config = rbac_pb2.RBAC()
    config.rules.action = rbac_cfg.RBAC.ALLOW
    config.rules.policies["allow"].CopyFrom(policy)
    ext = extension_pb2.TypedExtensionConfig(name=name)
    ext.typed_config.Pack(config)
    return ext


class Client:
    """One ADS stream (SotW or delta) driven by hand."""

    def __init__(
        self, socket: str, *, delta: bool = False, node: str = "node-1", channel: grpc.aio.Channel | None = None
    ) -> None:
        self.delta = delta
        self.node = node
        self.channel = channel if channel is not None else grpc.aio.insecure_channel(f"unix:{socket}")
        if delta:
            self.call: Any = self.channel.stream_stream(
                ADS + "DeltaAggregatedResources",
                request_serializer=d.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=d.DeltaDiscoveryResponse.FromString,
            )()
        else:
            self.call = self.channel.stream_stream(
                ADS + "StreamAggregatedResources",
                request_serializer=d.DiscoveryRequest.SerializeToString,
                response_deserializer=d.DiscoveryResponse.FromString,
            )()
        self.first = True
        self._next: asyncio.Future[Any] | None = None

    async def request(
        self,
        type_url: str,
        names: list[str] | None = None,
        nonce: str = "",
        version: str = "",
        error: str | None = None,
        unsubscribe: list[str] | None = None,
    ) -> None:
        if self.delta:
            req: Any = d.DeltaDiscoveryRequest(
                type_url=type_url,
                response_nonce=nonce,
                resource_names_subscribe=names or [],
                resource_names_unsubscribe=unsubscribe or [],
            )
        else:
            req = d.DiscoveryRequest(
                type_url=type_url, response_nonce=nonce, version_info=version, resource_names=names or []
            )
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        if self.first:
            req.node.id = self.node
            self.first = False
        await self.call.write(req)

    async def recv(self, timeout: float = 5.0) -> Any:
        if self._next is None:
            self._next = asyncio.ensure_future(self.call.read())
        result = await asyncio.wait_for(asyncio.shield(self._next), timeout)
        self._next = None
        return result

    async def silent(self, wait: float = 0.3) -> bool:
        """True when nothing arrives within `wait` seconds (a later `recv` gets it)."""
        try:
            self.unexpected = await self.recv(wait)
        except TimeoutError:
            return True
        return False

    async def ack(self, response: Any, names: list[str] | None = None) -> None:
        await self.request(
            response.type_url, names=names, nonce=response.nonce, version=getattr(response, "version_info", "")
        )

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def names_of(response: Any) -> list[str]:
    if isinstance(response, d.DeltaDiscoveryResponse):
        return sorted(r.name for r in response.resources)
    out = []
    for any_msg in response.resources:
        if any_msg.type_url.endswith("Cluster"):
            c = cluster_pb2.Cluster()
            any_msg.Unpack(c)
            out.append(c.name)
        else:
            e = extension_pb2.TypedExtensionConfig()
            any_msg.Unpack(e)
            out.append(e.name)
    return sorted(out)
