"""Prometheus metrics, computed on each scrape from the agent's live state.

Names follow Cilium (``cilium_`` becomes ``flagella_``): drop and forward
counters come from the kernel's per-CPU metrics map, summed over CPUs, and
the node proxy's L7 denials join the drops (reason ``Policy denied (L7)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from flagella.agent.controllers import Controller
from flagella.datapath.events import reason_text
from flagella.endpoint import State
from flagella.endpoint.regeneration import DURATION_BUCKETS

if TYPE_CHECKING:
    from flagella.agent.core import AgentCore

DIRECTIONS = {1: "INGRESS", 2: "EGRESS"}

def reason_name(code: int) -> str:
    return "Forwarded" if code == 0 else reason_text(code)


class AgentCollector(Collector):
    def __init__(
        self,
        core: AgentCore,
        controllers: Callable[[], Sequence[Controller]],
        l7_drops: Callable[[], Mapping[tuple[str, str], int]] | None = None,
    ) -> None:
        self.core = core
        self.controllers = controllers
        self.l7_drops = l7_drops

    def collect(self) -> Iterator[Any]:
        core = self.core
        drops = CounterMetricFamily("flagella_drop_count", "Dropped packets", labels=["reason", "direction"])
        drop_bytes = CounterMetricFamily("flagella_drop_bytes", "Dropped bytes", labels=["reason", "direction"])
        fwd = CounterMetricFamily("flagella_forward_count", "Forwarded packets", labels=["direction"])
        fwd_bytes = CounterMetricFamily("flagella_forward_bytes", "Forwarded bytes", labels=["direction"])
        try:
            counters = core.dp.metrics()
        except Exception:
            counters = {}
        for (reason, d), c in counters.items():
            direction = DIRECTIONS.get(d, "UNKNOWN")
            if reason == 0:
                fwd.add_metric([direction], c.packets)
                fwd_bytes.add_metric([direction], c.bytes)
            else:
                drops.add_metric([reason_name(reason), direction], c.packets)
                drop_bytes.add_metric([reason_name(reason), direction], c.bytes)
        for (l7_reason, direction), n in (self.l7_drops() if self.l7_drops else {}).items():
            drops.add_metric([l7_reason, direction], n)  # requests; no byte count
        yield from (drops, drop_bytes, fwd, fwd_bytes)
        yield GaugeMetricFamily("flagella_endpoint_count", "Endpoints", value=len(core.endpoints))
        states = GaugeMetricFamily("flagella_endpoint_state", "Endpoints per state", labels=["endpoint_state"])
        for state in State:
            states.add_metric([state.value], sum(1 for ep in list(core.endpoints.values()) if ep.state == state))
        yield states
        stats = core.pipeline.stats
        regen = CounterMetricFamily(
            "flagella_endpoint_regenerations", "Endpoint regenerations, by outcome", labels=["outcome"]
        )
        for outcome in ("success", "failure"):
            regen.add_metric([outcome], stats.outcomes.get(outcome, 0))
        yield regen
        buckets = [(str(b), n) for b, n in zip(DURATION_BUCKETS, stats.buckets, strict=False)]
        buckets.append(("+Inf", stats.buckets[-1]))
        yield HistogramMetricFamily(
            "flagella_endpoint_regeneration_time_stats_seconds",
            "Duration of endpoint regenerations, until every enforcer completed",
            buckets=buckets,
            sum_value=stats.duration_sum,
        )
        yield GaugeMetricFamily("flagella_policy_count", "Policies", value=len(core.engine.policies))
        yield GaugeMetricFamily("flagella_policy_max_revision", "Policy revision", value=core.engine.revision)
        yield CounterMetricFamily("flagella_policy_import_errors", "Rejected policy imports", value=core.stats.import_errors)
        yield GaugeMetricFamily("flagella_identity_count", "Identities", value=len(core.allocator.all()))
        repairs = CounterMetricFamily("flagella_map_repairs", "Map entries repaired by the sync controller", labels=["map"])
        for name, n in core.kernel.repairs.items():
            repairs.add_metric([name], n)
        yield repairs
        attach = CounterMetricFamily(
            "flagella_attach_repairs", "Programs reattached by the sync controller", labels=["program"]
        )
        for prog, n in core.stats.attach_repairs.items():
            attach.add_metric([prog], n)
        yield attach
        failing = sum(1 for c in self.controllers() if c.consecutive_failures)
        yield GaugeMetricFamily("flagella_controllers_failing", "Controllers failing", value=failing)


def start_metrics(
    core: AgentCore,
    controllers: Callable[[], Sequence[Controller]],
    extra: Sequence[Collector] = (),
    l7_drops: Callable[[], Mapping[tuple[str, str], int]] | None = None,
) -> None:
    """Serve the agent's metrics, and ``extra`` collectors' (the node proxy's)."""
    addr = core.settings.metrics_addr
    if not addr:
        return
    host, _, port = addr.rpartition(":")
    collector = AgentCollector(core, controllers, l7_drops)
    REGISTRY.register(collector)
    for c in extra:
        REGISTRY.register(c)
    start_http_server(int(port), addr=host or "127.0.0.1")
