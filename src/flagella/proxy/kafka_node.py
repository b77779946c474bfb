"""The node proxy's Kafka filter chains (identity from ECDS), as Envoy protos.

Theory of operation
-------------------
A Kafka port of an endpoint is one filter chain on the direction's
transparent listener, selected like an HTTP chain (destination address and
port on ingress, source address and destination port on egress)::

    network RBAC (ECDS: who is the peer) -> network ext_proc (the agent) -> tcp_proxy (ORIGINAL_DST)

The RBAC filter's ``rules`` allow everything (the kernel decided L3/L4); its
``shadow_rules`` hold one policy ``identity-<id>`` per identity of the
ipcache, matching that identity's address set under longest-prefix match
(`flagella.proxy.rbac.peer_sets`): the source on ingress, the original
destination on egress. The sets are disjoint, so exactly one policy
matches, and Envoy forwards its name to the agent's ext_proc service
(`flagella.proxy.kafka_envoy`), which then asks the agent for that peer's
rules. The config comes over ECDS under `identity_filter_name`, so a new
pod or a relabel changes one small resource and never rebuilds a listener
(which would drain the chain's open Kafka connections). The ext_proc
service is the agent's own gRPC server, reached through the bootstrap's
``flagella-xds`` cluster (the xDS socket).

Pure: builds protobuf messages, does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from flagella.proxy.kafka_envoy import ChainKey, KafkaRedirect, agent_grpc_service, kafka_ext_proc
from flagella.proxy.listeners import ACCESS_LOG_CLUSTER, ORIGINAL_DST_CLUSTER, cidr_range, packed
from flagella.proxy.rbac import PeerSet, peer_condition

NET_RBAC_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
#: The bootstrap's cluster to the agent's gRPC server (xDS, access log, Kafka ext_proc).
AGENT_CLUSTER = ACCESS_LOG_CLUSTER


def identity_filter_name(chain: ChainKey) -> str:
    """The ECDS resource name of a Kafka chain's identity RBAC config."""
    return f"flagella/{chain.endpoint_id}/{'egress' if chain.egress else 'ingress'}/{chain.port}/kafka-peer"


def identity_rbac(chain: ChainKey, peers: Mapping[int, PeerSet]) -> net_rbac_pb2.RBAC:
    """Allow-all rules; one shadow policy per identity, matching its address set."""
    anything = rbac_pb2.Policy(
        permissions=[rbac_pb2.Permission(any=True)], principals=[rbac_pb2.Principal(any=True)]
    )
    shadow: dict[str, rbac_pb2.Policy] = {}
    for ident, peer in sorted(peers.items()):
        condition = peer_condition(peer, chain.egress)
        if chain.egress:
            policy = rbac_pb2.Policy(permissions=[condition], principals=[rbac_pb2.Principal(any=True)])
        else:
            policy = rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)], principals=[condition])
        shadow[f"identity-{ident}"] = policy
    return net_rbac_pb2.RBAC(
        stat_prefix=chain.stat_prefix,
        rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies={"allow-all": anything}),
        shadow_rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies=shadow),
        shadow_rules_stat_prefix=chain.stat_prefix,
    )


def kafka_node_chain(
    redirect: KafkaRedirect, ecds: config_source_pb2.ConfigSource, agent_cluster: str = AGENT_CLUSTER
) -> listener_components_pb2.FilterChain:
    """One Kafka port's chain on the node's transparent listener. Until its identity
    config arrives the chain is not used (no default config: the listener warms)."""
    chain = redirect.chain
    match = listener_components_pb2.FilterChainMatch(destination_port=wrappers_pb2.UInt32Value(value=chain.port))
    cidrs = [cidr_range(a) for a in redirect.addresses]
    (match.source_prefix_ranges if chain.egress else match.prefix_ranges).extend(cidrs)
    rbac = listener_components_pb2.Filter(
        name=identity_filter_name(chain),
        config_discovery=config_source_pb2.ExtensionConfigSource(
            config_source=ecds, type_urls=[NET_RBAC_TYPE_URL]
        ),
    )
    ext_proc = listener_components_pb2.Filter(
        name="envoy.filters.network.ext_proc",
        typed_config=packed(kafka_ext_proc(chain, agent_grpc_service(agent_cluster))),
    )
    tcp_proxy = listener_components_pb2.Filter(
        name="envoy.filters.network.tcp_proxy",
        typed_config=packed(tcp_proxy_pb2.TcpProxy(stat_prefix=chain.stat_prefix, cluster=ORIGINAL_DST_CLUSTER)),
    )
    return listener_components_pb2.FilterChain(
        name=chain.name, filter_chain_match=match, filters=[rbac, ext_proc, tcp_proxy]
    )


__all__ = [
    "AGENT_CLUSTER",
    "NET_RBAC_TYPE_URL",
    "identity_filter_name",
    "identity_rbac",
    "kafka_node_chain",
]
