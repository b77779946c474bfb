"""An endpoint's resolved policy, as the L7 rules the node proxy enforces per port.

Theory of operation. The kernel redirects a flow when the MapState lookup
for (peer, TCP, port) decides REDIRECT; the L7 policy that then applies is
the one that lookup returns (``Decision.l7``: the merged rules of every
redirect key of the deciding tier). This module asks the same question per
port, for every peer that has keys of its own and for "any other peer",
with the same `decide` function the kernel and trace agree with, so Envoy
can never hold a peer to other rules than `flagella policy trace` shows.

Every TCP port covered by a REDIRECT key whose L7 parser is HTTP gets one
`PortHTTPPolicy`: the filter chain's identity (endpoint, direction, port,
the endpoint's addresses) and its RBAC config. Port ranges are expanded,
up to `MAX_PORTS_PER_DIRECTION` ports per endpoint and direction; beyond
that the ports are reported and left without a chain, which Envoy answers
by closing the connection (fail closed).

Every TCP port covered by a Kafka REDIRECT key gets one `PortKafkaPolicy`
instead: the chain (`flagella.proxy.kafka_envoy.KafkaRedirect`) and the L7
policy of each peer identity the kernel redirects there (identity 0 for
every other peer). `PortKafkaPolicy.rules_for` is what the agent's Kafka
ext_proc service asks, per connection, with the identity Envoy's shadow
RBAC named.

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2

from flagella.policy.mapstate import ANY_IDENTITY, ANY_PROTOCOL, L7Policy, MapState, Verdict, decide
from flagella.proxy.kafka_envoy import ChainKey, KafkaRedirect
from flagella.proxy.listeners import HTTPRedirect
from flagella.proxy.rbac import PeerSet, http_rbac

TCP = 6
MAX_PORTS_PER_DIRECTION = 1024
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class PortHTTPPolicy:
    redirect: HTTPRedirect
    rbac: http_rbac_pb2.RBAC


@dataclass(frozen=True)
class DirectionHTTPPolicy:
    ports: tuple[PortHTTPPolicy, ...]
    #: Redirected ports left without a chain (over the per-direction cap).
    dropped_ports: int = 0


def http_redirect_ports(state: MapState, parser: str = "http") -> list[int]:
    """Every TCP port some REDIRECT key of ``parser`` (HTTP by default) covers, ascending."""
    ports: set[int] = set()
    for key, entry in state:
        if entry.verdict != Verdict.REDIRECT or entry.l7 is None or entry.l7.parser != parser:
            continue
        if key.protocol not in (TCP, ANY_PROTOCOL):
            continue
        ports.update(range(key.port, key.end_port + 1))
        if len(ports) > MAX_PORTS_PER_DIRECTION * 64:
            break  # a 0-65535 redirect: the cap below reports it
    return sorted(ports)


def port_redirects(state: MapState, port: int, parser: str = "http") -> list[tuple[int, L7Policy]]:
    """(peer identity, L7 policy) of every peer the kernel redirects on ``port``.

    Identity 0 stands for every peer without keys of its own on the port.
    """
    matching = [(k, e) for k, e in state if k.matches(k.identity, TCP, port)]
    specific = sorted({k.identity for k, _ in matching if k.identity != ANY_IDENTITY})
    out = []
    for ident in [ANY_IDENTITY, *specific]:
        keys = [(k, e) for k, e in matching if k.identity in (ANY_IDENTITY, ident)]
        decision = decide(keys, state.enforced)
        if decision.verdict == Verdict.REDIRECT and decision.l7 is not None and decision.l7.parser == parser:
            out.append((ident, decision.l7))
    return out


def direction_http_policy(
    endpoint_id: int,
    addresses: Iterable[IPAddress],
    state: MapState,
    egress: bool,
    peers: Mapping[int, PeerSet],
    wildcard_identities: Iterable[int] = (),
) -> DirectionHTTPPolicy:
    ports = http_redirect_ports(state)
    kept, dropped = ports[:MAX_PORTS_PER_DIRECTION], max(0, len(ports) - MAX_PORTS_PER_DIRECTION)
    addrs = tuple(addresses)
    wild = tuple(wildcard_identities)
    out = []
    for port in kept:
        redirects = port_redirects(state, port)
        if not redirects:
            continue
        out.append(
            PortHTTPPolicy(
                HTTPRedirect(endpoint_id, egress, port, addrs),
                http_rbac(redirects, peers, egress, wild),
            )
        )
    return DirectionHTTPPolicy(tuple(out), dropped)


@dataclass(frozen=True)
class PortKafkaPolicy:
    redirect: KafkaRedirect
    #: Peer identity -> the L7 policy it is held to (identity 0: every other peer).
    rules: Mapping[int, L7Policy]

    def rules_for(self, identity: int) -> L7Policy | None:
        """The policy of ``identity`` on this port; None if the kernel never redirects it."""
        return self.rules.get(identity) or self.rules.get(ANY_IDENTITY)


@dataclass(frozen=True)
class DirectionKafkaPolicy:
    ports: tuple[PortKafkaPolicy, ...] = ()
    dropped_ports: int = 0


def direction_kafka_policy(
    endpoint_id: int,
    addresses: Iterable[IPAddress],
    state: MapState,
    egress: bool,
    wildcard_identities: Iterable[int] = (),
) -> DirectionKafkaPolicy:
    """The Kafka chains of one endpoint and direction, with each peer's rules."""
    ports = http_redirect_ports(state, "kafka")
    kept, dropped = ports[:MAX_PORTS_PER_DIRECTION], max(0, len(ports) - MAX_PORTS_PER_DIRECTION)
    addrs = tuple(addresses)
    out = []
    for port in kept:
        merged: dict[int, L7Policy] = {}
        for ident, l7 in port_redirects(state, port, "kafka"):
            merged[ident] = merged[ident].merge(l7) if ident in merged else l7
        if not merged:
            continue
        for ident in wildcard_identities:
            # The host override of spec 3.3, as for HTTP (`flagella.proxy.rbac.http_rbac`).
            merged[ident] = merged.get(ident, L7Policy("kafka")).with_wildcard()
        out.append(PortKafkaPolicy(KafkaRedirect(ChainKey(endpoint_id, egress, port), addrs), merged))
    return DirectionKafkaPolicy(tuple(out), dropped)


__all__ = [
    "MAX_PORTS_PER_DIRECTION",
    "DirectionKafkaPolicy",
    "PortKafkaPolicy",
    "direction_kafka_policy",
    "DirectionHTTPPolicy",
    "PortHTTPPolicy",
    "direction_http_policy",
    "http_redirect_ports",
    "port_redirects",
]
