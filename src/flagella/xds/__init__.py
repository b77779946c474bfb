"""Flagella's xDS control plane for Envoy.

- `flagella.xds.cache`: resources serialized once, versioned by content hash.
- `flagella.xds.stream`: the sans-IO per-stream, per-type protocol state.
- `flagella.xds.debounce`: push debouncing and the clock seam.
- `flagella.xds.server`: grpc.aio ADS (SotW and delta) and per-type services,
  with completions that resolve on Envoy's ACK.
- `flagella.xds.status`: proxy-status rows, their rendering, metrics.

(The import name `xds` belongs to xds-protos; this package is `flagella.xds`.)
"""

from flagella.xds.cache import CachedResource, ResourceCache, TypeView
from flagella.xds.debounce import Clock, FakeClock, MonotonicClock
from flagella.xds.server import XdsError, XdsNack, XdsServer, XdsSettings, XdsTimeout
from flagella.xds.status import NodeStatus, TypeStatus, XdsMetrics, render_proxy_status
from flagella.xds.stream import Request, StreamState

__all__ = [
    "CachedResource",
    "Clock",
    "FakeClock",
    "MonotonicClock",
    "NodeStatus",
    "Request",
    "ResourceCache",
    "StreamState",
    "TypeStatus",
    "TypeView",
    "XdsError",
    "XdsMetrics",
    "XdsNack",
    "XdsServer",
    "XdsSettings",
    "XdsTimeout",
    "render_proxy_status",
]
