"""Sync status (`flagella proxy status`) and the xDS metrics.

`NodeStatus` rows list every connected stream with, per type, the version
sent and ACKed, the last NACK's error and the time of the last ACK, in the
spirit of `istioctl proxy-status`. `render_proxy_status` turns rows into the
CLI's text table or JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from flagella.xds.types import push_rank, short_name


@dataclass(frozen=True)
class TypeStatus:
    type_url: str
    version_sent: str
    nonce_sent: str
    version_acked: str
    last_error: str
    last_ack_time: float | None  # wall clock, seconds since the epoch
    phase: str


@dataclass(frozen=True)
class NodeStatus:
    node: str
    cluster: str
    stream: str  # "ads", "ads-delta", "ecds", ...
    connected_at: float
    types: tuple[TypeStatus, ...]


def rows_to_json(rows: list[NodeStatus]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def rows_from_json(docs: list[dict[str, Any]]) -> list[NodeStatus]:
    """The inverse of `rows_to_json`, for the CLI on the other side of the agent socket."""
    return [
        NodeStatus(
            node=d["node"],
            cluster=d["cluster"],
            stream=d["stream"],
            connected_at=d["connected_at"],
            types=tuple(TypeStatus(**t) for t in d["types"]),
        )
        for d in docs
    ]


def _state(t: TypeStatus) -> str:
    if t.last_error and t.phase == "nacked":
        return "NACKED"
    if t.version_sent and t.version_sent == t.version_acked:
        return "SYNCED"
    if t.version_sent:
        return "STALE"
    return "NOT SENT"


def render_proxy_status(rows: list[NodeStatus], output: str = "text") -> str:
    """`output` is "text" (a table, one column per type) or "json"."""
    ordered = sorted(rows, key=lambda r: (r.node, r.stream))
    if output == "json":
        return json.dumps(rows_to_json(ordered), indent=2, sort_keys=True) + "\n"
    if output != "text":
        raise ValueError(f"output: must be text or json, not {output!r}")
    type_urls = sorted({t.type_url for r in rows for t in r.types}, key=lambda u: (push_rank(u), u))
    header = ["NODE", "STREAM", *(short_name(u) for u in type_urls)]
    lines = [header]
    details: list[str] = []
    for row in ordered:
        by_type = {t.type_url: t for t in row.types}
        cells = [row.node, row.stream]
        for url in type_urls:
            t = by_type.get(url)
            if t is None:
                cells.append("-")
                continue
            cells.append(f"{_state(t)} ({t.version_acked[:8] or '-'})")
            if t.last_error:
                details.append(f"{row.node} {short_name(url)} last NACK: {t.last_error}")
            if t.last_ack_time is not None:
                when = time.strftime("%H:%M:%S", time.gmtime(t.last_ack_time))
                details.append(f"{row.node} {short_name(url)} last ACK {when}Z sent {t.version_sent[:8]}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)
    return table + "\n" + "".join(d + "\n" for d in details)


class XdsMetrics:
    """Counters and the push-to-ACK latency histogram, on a registry passed in."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        self.registry = reg
        self.pushes = Counter("flagella_xds_pushes", "xDS responses sent", ["type"], registry=reg)
        self.acks = Counter("flagella_xds_acks", "xDS ACKs received", ["type"], registry=reg)
        self.nacks = Counter("flagella_xds_nacks", "xDS NACKs received", ["type"], registry=reg)
        self.stalled = Counter(
            "flagella_xds_stalled_writes",
            "xDS responses not taken within write_timeout (the stream gave its push slot back)",
            registry=reg,
        )
        self.push_latency = Histogram(
            "flagella_xds_push_latency_seconds",
            "Time from sending an xDS response to its ACK",
            ["type"],
            registry=reg,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
