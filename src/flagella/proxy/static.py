"""A static node-proxy configuration: the two transparent listeners with inline RBAC.

Until the xDS server delivers listeners and ECDS filter configs, this one
function is the whole wiring from resolved policy to a running Envoy: it
takes the per-port HTTP policies of each direction
(`flagella.proxy.l7policy.direction_http_policy`), builds the ingress and
egress listeners with `flagella.proxy.listeners.transparent_listener`, and
puts each chain's RBAC config inline in place of the ECDS default. Egress
chains get a second RBAC filter with the ingress rules of the local
endpoints their port reaches (`flagella.proxy.rbac.local_ingress_rbac`):
the egress proxy's upstream is not redirected again, so this is where those
rules are applied.

Pure: builds the bootstrap dict, does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from flagella.proxy import listeners as L
from flagella.proxy.envoy import bootstrap
from flagella.proxy.l7policy import PortHTTPPolicy
from flagella.proxy.ports import ProxySettings


def _inline(
    listener: Any,
    rbacs: Mapping[str, http_rbac_pb2.RBAC],
    second: Mapping[int, http_rbac_pb2.RBAC],
) -> None:
    for chain in listener.filter_chains:
        hcm = hcm_pb2.HttpConnectionManager()
        chain.filters[0].typed_config.Unpack(hcm)
        hcm.http_filters[0].typed_config.Pack(rbacs[chain.name])
        extra = second.get(chain.filter_chain_match.destination_port.value)
        if extra is not None:
            hcm.http_filters.insert(
                1, hcm_pb2.HttpFilter(name=f"{chain.name}/local-ingress", typed_config=L.packed(extra))
            )
        chain.filters[0].typed_config.Pack(hcm)


def static_bootstrap(
    node_id: str,
    admin_port: int,
    ports: ProxySettings,
    ingress: Iterable[PortHTTPPolicy],
    egress: Iterable[PortHTTPPolicy],
    local_ingress: Mapping[int, http_rbac_pb2.RBAC] | None = None,
) -> dict[str, Any]:
    """The node proxy's bootstrap for these policies. ``local_ingress`` maps a port to
    the second RBAC filter of every egress chain of that port (see the module doc)."""
    listeners = []
    for name, port, policies, second in (
        ("flagella-ingress", ports.ingress_port, list(ingress), {}),
        ("flagella-egress", ports.egress_port, list(egress), dict(local_ingress or {})),
    ):
        if not policies:
            continue  # Envoy refuses a listener without chains; nothing is redirected there
        listener = L.transparent_listener(name, port, [p.redirect for p in policies], None)
        _inline(listener, {p.redirect.filter_name: p.rbac for p in policies}, second)
        listeners.append(json_format.MessageToDict(listener, preserving_proto_field_name=True))
    cluster = json_format.MessageToDict(L.original_dst_cluster(), preserving_proto_field_name=True)
    return bootstrap(
        node_id, "/nonexistent.sock", admin_port,
        static_resources={"listeners": listeners, "clusters": [cluster]}, ads=False,
    )


__all__ = ["static_bootstrap"]
