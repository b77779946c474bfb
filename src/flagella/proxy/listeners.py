"""The node proxy's listeners, clusters and HTTP filter chains, as Envoy protos.

Theory of operation. The node-local Envoy has two transparent listeners,
one per direction, on loopback; the datapath hands redirected flows to
them with TPROXY, keeping both the original source (the peer, for RBAC)
and the original destination (``original_dst``, for the upstream). Every
(endpoint, direction, port) that carries HTTP rules is one filter chain,
selected by the original destination address and port on ingress and by
the source address and destination port on egress. The chain runs an HTTP
connection manager (HTTP/1.1 and cleartext HTTP/2 alike, codec AUTO) with
one RBAC filter and the router, and goes upstream through an
``ORIGINAL_DST`` cluster, bound to the peer's address by ``original_src``.

The RBAC filter's config is not inline: it comes from ECDS under the name
``filter_name(...)``, so a policy or identity change is one small ECDS
resource and never rebuilds a listener. Until the first config arrives
the filter has a deny-all default (fail closed). Denials answer 403 with
Cilium's body ``Access denied\\r\\n`` through a local reply mapper.

Pure: builds protobuf messages, does no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
    protocol_pb2,
    socket_option_pb2,
)
from envoy.config.core.v3.substitution_format_string_pb2 import SubstitutionFormatString
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2

from flagella.proxy.rbac import RBAC_TYPE_URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ORIGINAL_DST_CLUSTER = "flagella-original-dst"
ACCESS_LOG_CLUSTER = "flagella-xds"
DENIED_BODY = "Access denied\r\n"
#: The mark Envoy's upstream sockets carry (``original_src``): the datapath never
#: redirects such packets again, and policy routing sends their replies back to Envoy.
UPSTREAM_MARK = 0x300
_SOL_SOCKET, _SO_KEEPALIVE = 1, 9


def packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


@dataclass(frozen=True)
class HTTPRedirect:
    """One endpoint port whose HTTP traffic the node proxy enforces."""

    endpoint_id: int
    egress: bool
    port: int
    #: The endpoint's addresses: the destination on ingress, the source on egress.
    addresses: tuple[IPAddress, ...]

    @property
    def filter_name(self) -> str:
        return filter_name(self.endpoint_id, self.egress, self.port)


def filter_name(endpoint_id: int, egress: bool, port: int) -> str:
    """The ECDS resource name of one endpoint/direction/port's RBAC config."""
    return f"flagella/{endpoint_id}/{'egress' if egress else 'ingress'}/{port}"


def local_ingress_filter_name(redirect: HTTPRedirect) -> str:
    """The ECDS name of an egress chain's second RBAC filter: the ingress HTTP rules of
    the local endpoints its port reaches (`flagella.proxy.rbac.local_ingress_rbac`)."""
    return f"{redirect.filter_name}/local-ingress"


def deny_all() -> http_rbac_pb2.RBAC:
    """An RBAC config that denies every request (the default before policy arrives)."""
    return http_rbac_pb2.RBAC(rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW))


def local_reply_config() -> hcm_pb2.LocalReplyConfig:
    """403s that Envoy generates itself carry Cilium's body, not ``RBAC: access denied``."""
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            hcm_pb2.ResponseMapper(
                filter=accesslog_pb2.AccessLogFilter(
                    status_code_filter=accesslog_pb2.StatusCodeFilter(
                        comparison=accesslog_pb2.ComparisonFilter(
                            op=accesslog_pb2.ComparisonFilter.EQ,
                            value=base_pb2.RuntimeUInt32(default_value=403, runtime_key="flagella.denied_status"),
                        )
                    )
                ),
                body_format_override=SubstitutionFormatString(
                    text_format_source=base_pb2.DataSource(inline_string=DENIED_BODY),
                    content_type="text/plain",
                ),
            )
        ]
    )


def rbac_http_filter(name: str, ecds: config_source_pb2.ConfigSource | None) -> hcm_pb2.HttpFilter:
    """The RBAC filter of a chain: from ECDS under ``name``, deny-all until it arrives."""
    if ecds is None:
        return hcm_pb2.HttpFilter(name=name, typed_config=packed(deny_all()))
    return hcm_pb2.HttpFilter(
        name=name,
        config_discovery=config_source_pb2.ExtensionConfigSource(
            config_source=ecds,
            default_config=packed(deny_all()),
            apply_default_config_without_warming=True,
            type_urls=[RBAC_TYPE_URL],
        ),
    )


def http_connection_manager(
    stat_prefix: str,
    rbac: hcm_pb2.HttpFilter,
    cluster: str,
    access_log: accesslog_pb2.AccessLog | None = None,
) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(
            name=stat_prefix,
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name="all",
                    domains=["*"],
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix="/"),
                            route=route_components_pb2.RouteAction(
                                cluster=cluster, timeout=duration_pb2.Duration(seconds=0)
                            ),
                        )
                    ],
                )
            ],
        ),
        http_filters=[
            rbac,
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=packed(router_pb2.Router())),
        ],
        local_reply_config=local_reply_config(),
        access_log=[access_log] if access_log is not None else [],
        # A transparent proxy forwards what it got: no header rewriting, no XFF.
        use_remote_address=wrappers_pb2.BoolValue(value=False),
        normalize_path=wrappers_pb2.BoolValue(value=False),
        http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
    )


def access_log_to_agent(log_name: str, cluster: str = ACCESS_LOG_CLUSTER) -> accesslog_pb2.AccessLog:
    """Every request, allowed or denied, streamed to the agent's access-log service."""
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc",
        typed_config=packed(
            als_pb2.HttpGrpcAccessLogConfig(
                common_config=als_pb2.CommonGrpcAccessLogConfig(
                    log_name=log_name,
                    transport_api_version=config_source_pb2.V3,
                    grpc_service=grpc_service_pb2.GrpcService(
                        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster)
                    ),
                )
            )
        ),
    )


def cidr_range(addr: IPAddress) -> address_pb2.CidrRange:
    """One address as a host-length ``CidrRange`` (filter chain matches)."""
    return address_pb2.CidrRange(
        address_prefix=str(addr), prefix_len=wrappers_pb2.UInt32Value(value=addr.max_prefixlen)
    )


def filter_chain(
    redirect: HTTPRedirect,
    ecds: config_source_pb2.ConfigSource | None,
    access_log_cluster: str | None = None,
) -> listener_components_pb2.FilterChain:
    """One endpoint port's chain; with ``access_log_cluster``, requests are logged
    to the agent under the chain's name (see `flagella.proxy.accesslog`)."""
    match = listener_components_pb2.FilterChainMatch(
        destination_port=wrappers_pb2.UInt32Value(value=redirect.port)
    )
    cidrs = [cidr_range(a) for a in redirect.addresses]
    if redirect.egress:
        match.source_prefix_ranges.extend(cidrs)
    else:
        match.prefix_ranges.extend(cidrs)
    hcm = http_connection_manager(
        redirect.filter_name.replace("/", "_"),
        rbac_http_filter(redirect.filter_name, ecds),
        ORIGINAL_DST_CLUSTER,
        access_log_to_agent(redirect.filter_name, access_log_cluster) if access_log_cluster else None,
    )
    if redirect.egress and ecds is not None:
        # Envoy's upstream is never redirected again (mark 0x300), so the destination's
        # own ingress HTTP rules, when it is a local endpoint, are applied here.
        hcm.http_filters.insert(1, rbac_http_filter(local_ingress_filter_name(redirect), ecds))
    return listener_components_pb2.FilterChain(
        name=redirect.filter_name,
        filter_chain_match=match,
        filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=packed(hcm)
            )
        ],
    )


def _keepalive() -> list[socket_option_pb2.SocketOption]:
    return [
        socket_option_pb2.SocketOption(
            description="SO_KEEPALIVE",
            level=_SOL_SOCKET,
            name=_SO_KEEPALIVE,
            int_value=1,
            state=socket_option_pb2.SocketOption.STATE_PREBIND,
        )
    ]


def transparent_listener(
    name: str,
    port: int,
    redirects: Iterable[HTTPRedirect],
    ecds: config_source_pb2.ConfigSource | None,
    access_log_cluster: str | None = None,
    ipv6: bool = True,
    other_chains: Iterable[listener_components_pb2.FilterChain] = (),
) -> listener_pb2.Listener:
    """One direction's listener on 127.0.0.1 (and ::1) at ``port``: a chain per HTTP
    redirect, then ``other_chains`` (Kafka, `flagella.proxy.kafka_node`)."""
    chains = [filter_chain(r, ecds, access_log_cluster) for r in sorted(redirects, key=_redirect_order)]
    chains += list(other_chains)
    listener = listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        ),
        transparent=wrappers_pb2.BoolValue(value=True),
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.original_dst",
                typed_config=packed(original_dst_pb2.OriginalDst()),
            ),
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.original_src",
                typed_config=packed(original_src_pb2.OriginalSrc(mark=UPSTREAM_MARK)),
            ),
        ],
        filter_chains=chains,
        # No default chain: a flow redirected before its chain exists is closed.
        socket_options=_keepalive(),
    )
    if ipv6:
        listener.additional_addresses.add().address.socket_address.CopyFrom(
            address_pb2.SocketAddress(address="::1", port_value=port)
        )
    return listener


def _redirect_order(r: HTTPRedirect) -> tuple[int, bool, int]:
    return (r.endpoint_id, r.egress, r.port)


def original_dst_cluster() -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=ORIGINAL_DST_CLUSTER,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration_pb2.Duration(seconds=5),
        upstream_connection_options=cluster_pb2.UpstreamConnectionOptions(
            tcp_keepalive=address_pb2.TcpKeepalive()
        ),
        # HTTP/2 downstream (gRPC) goes upstream as HTTP/2, HTTP/1.1 as HTTP/1.1.
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": packed(_use_downstream_protocol())
        },
    )


def _use_downstream_protocol() -> message.Message:
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo

    return hpo.HttpProtocolOptions(use_downstream_protocol_config=hpo.HttpProtocolOptions.UseDownstreamHttpConfig(
        http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
        http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
    ))


def ads_config_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3)


def typed_extension_config(name: str, config: message.Message) -> extension_pb2.TypedExtensionConfig:
    """An ECDS resource: a filter config under the name the filter asks for."""
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=packed(config))


__all__ = [
    "DENIED_BODY",
    "HTTPRedirect",
    "ORIGINAL_DST_CLUSTER",
    "UPSTREAM_MARK",
    "access_log_to_agent",
    "ads_config_source",
    "cidr_range",
    "deny_all",
    "filter_chain",
    "filter_name",
    "local_ingress_filter_name",
    "http_connection_manager",
    "local_reply_config",
    "original_dst_cluster",
    "packed",
    "rbac_http_filter",
    "transparent_listener",
    "typed_extension_config",
]
