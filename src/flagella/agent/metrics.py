"""Prometheus metrics, computed on each scrape from the agent's live state.

Names follow Cilium (``cilium_`` becomes ``flagella_``): drop and forward
counters come from the kernel's per-CPU metrics map, summed over CPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flagella.datapath.events import reason_text

if TYPE_CHECKING:
    from flagella.agent.server import AgentServer

DIRECTIONS = {1: "INGRESS", 2: "EGRESS"}

def reason_name(code: int) -> str:
    return "Forwarded" if code == 0 else reason_text(code)


class AgentCollector(Collector):
    def __init__(self, server: AgentServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        core = self.server.core
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
        yield from (drops, drop_bytes, fwd, fwd_bytes)
        yield GaugeMetricFamily("flagella_endpoint_count", "Endpoints", value=len(core.endpoints))
        regen = CounterMetricFamily("flagella_endpoint_regenerations", "Endpoint regenerations", labels=["outcome"])
        for outcome in ("success", "fail"):
            regen.add_metric([outcome], core.stats.regenerations.get(outcome, 0))
        yield regen
        yield GaugeMetricFamily("flagella_policy_count", "Policies", value=len(core.engine.policies))
        yield GaugeMetricFamily("flagella_policy_max_revision", "Policy revision", value=core.engine.revision)
        yield CounterMetricFamily("flagella_policy_import_errors", "Rejected policy imports", value=core.stats.import_errors)
        yield GaugeMetricFamily("flagella_identity_count", "Identities", value=len(core.allocator.all()))
        repairs = CounterMetricFamily("flagella_map_repairs", "Map entries repaired by the sync controller", labels=["map"])
        for name, n in core.stats.repairs.items():
            repairs.add_metric([name], n)
        yield repairs
        attach = CounterMetricFamily(
            "flagella_attach_repairs", "Programs reattached by the sync controller", labels=["program"]
        )
        for prog, n in core.stats.attach_repairs.items():
            attach.add_metric([prog], n)
        yield attach
        failing = sum(1 for c in self.server.controllers if c.consecutive_failures)
        yield GaugeMetricFamily("flagella_controllers_failing", "Controllers failing", value=failing)


def start_metrics(server: AgentServer) -> None:
    addr = server.core.settings.metrics_addr
    if not addr:
        return
    host, _, port = addr.rpartition(":")
    collector = AgentCollector(server)
    REGISTRY.register(collector)
    start_http_server(int(port), addr=host or "127.0.0.1")
