"""Resource type URLs, the push order, and which types are full-state.

ADS sends types in `PUSH_ORDER` (CDS, EDS, LDS, RDS, then ECDS and the rest),
the "make before break" order of the xDS protocol: a listener never names a
cluster Envoy has not got yet. Wildcard subscriptions and full-state SotW
responses exist only for listeners and clusters.
"""

from __future__ import annotations

PREFIX = "type.googleapis.com/"
CLUSTER = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = PREFIX + "envoy.config.route.v3.RouteConfiguration"
EXTENSION_CONFIG = PREFIX + "envoy.config.core.v3.TypedExtensionConfig"
SECRET = PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, EXTENSION_CONFIG, SECRET)
FULL_STATE: frozenset[str] = frozenset({CLUSTER, LISTENER})

SHORT_NAMES: dict[str, str] = {
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    LISTENER: "LDS",
    ROUTE: "RDS",
    EXTENSION_CONFIG: "ECDS",
    SECRET: "SDS",
}


def short_name(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.removeprefix(PREFIX))


def push_rank(type_url: str) -> int:
    """Position in the push order; unknown types go last, in name order by the caller."""
    try:
        return PUSH_ORDER.index(type_url)
    except ValueError:
        return len(PUSH_ORDER)
