"""L7 visibility: Envoy's gRPC access-log stream, turned into Flagella's L7 records.

Every HTTP filter chain of the node proxy logs each request to the agent's
``AccessLogService`` under the log name of its chain (`filter_name`:
endpoint, direction, port), so a stream's first message says which
endpoint and direction all of its entries belong to. An entry becomes an
`L7Record`: both addresses, both identities (looked up in the ipcache the
datapath uses), method, URL, status, and the verdict. A request is
*Denied* when Envoy's RBAC filter refused it (its response-code details
start with ``rbac_access_denied``), *Forwarded* otherwise.

`format_l7` prints a record the way ``cilium monitor -t l7`` did. The
servicer takes a callback so the agent decides where records go (monitor
subscribers, metrics); the parsing is pure.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class L7Record:
    time: float
    endpoint_id: int
    egress: bool
    src: str
    src_port: int
    dst: str
    dst_port: int
    src_identity: int
    dst_identity: int
    method: str
    url: str
    protocol: str
    status: int
    verdict: str  # "Forwarded" | "Denied" | "Error"

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "l7",
            "time": self.time,
            "endpoint": self.endpoint_id,
            "direction": "egress" if self.egress else "ingress",
            "src": f"{self.src}:{self.src_port}" if self.src else "",
            "dst": f"{self.dst}:{self.dst_port}" if self.dst else "",
            "src_identity": self.src_identity,
            "dst_identity": self.dst_identity,
            "method": self.method,
            "url": self.url,
            "protocol": self.protocol,
            "status": self.status,
            "verdict": self.verdict,
        }


def parse_log_name(name: str) -> tuple[int, bool] | None:
    """(endpoint id, egress) from a chain's log name ``flagella/<id>/<direction>/<port>``."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "flagella" or parts[2] not in ("ingress", "egress"):
        return None
    try:
        return int(parts[1]), parts[2] == "egress"
    except ValueError:
        return None


def _address(addr: Any) -> tuple[str, int]:
    sock = addr.socket_address
    return sock.address, sock.port_value


_PROTOCOLS = {
    accesslog_pb2.HTTPAccessLogEntry.HTTP10: "HTTP/1.0",
    accesslog_pb2.HTTPAccessLogEntry.HTTP11: "HTTP/1.1",
    accesslog_pb2.HTTPAccessLogEntry.HTTP2: "HTTP/2",
    accesslog_pb2.HTTPAccessLogEntry.HTTP3: "HTTP/3",
}


def record(
    entry: accesslog_pb2.HTTPAccessLogEntry,
    endpoint_id: int,
    egress: bool,
    identity_of: Callable[[IPAddress], int],
) -> L7Record:
    common = entry.common_properties
    src, sport = _address(common.downstream_remote_address)
    # Under TPROXY the listener's local address is the original destination.
    dst, dport = _address(common.downstream_local_address)
    req, resp = entry.request, entry.response
    status = resp.response_code.value if resp.HasField("response_code") else 0
    details = resp.response_code_details
    if details.startswith("rbac_access_denied"):
        verdict = "Denied"
    elif status == 0 or details.startswith(("upstream_reset", "cluster_not_found", "no_healthy")):
        verdict = "Error"
    else:
        verdict = "Forwarded"
    scheme = req.scheme or "http"
    url = f"{scheme}://{req.authority}{req.path}" if req.authority else req.path
    return L7Record(
        time=common.start_time.ToNanoseconds() / 1e9 if common.HasField("start_time") else time.time(),
        endpoint_id=endpoint_id,
        egress=egress,
        src=src,
        src_port=sport,
        dst=dst,
        dst_port=dport,
        src_identity=_identity(identity_of, src),
        dst_identity=_identity(identity_of, dst),
        method=base_pb2.RequestMethod.Name(req.request_method) if req.request_method else "",
        url=url,
        protocol=_PROTOCOLS.get(entry.protocol_version, ""),
        status=status,
        verdict=verdict,
    )


def _identity(identity_of: Callable[[IPAddress], int], addr: str) -> int:
    try:
        return identity_of(ipaddress.ip_address(addr))
    except ValueError:
        return 0


def format_l7(r: L7Record) -> str:
    arrow = "->" if r.egress else "<-"
    return (
        f"{arrow} endpoint {r.endpoint_id} {'egress' if r.egress else 'ingress'} Request http "
        f"from {r.src}:{r.src_port} to {r.dst}:{r.dst_port}, identity {r.src_identity}->{r.dst_identity}, "
        f"verdict {r.verdict} {r.method} {r.url} => {r.status}"
    )


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Receives Envoy's access-log streams and hands each entry to ``sink``.

    ``errors`` counts entries that could not be attributed (an unknown log
    name): they are Flagella's policy_l7_total{rule="parse_errors"}.
    """

    def __init__(
        self, sink: Callable[[L7Record], None], identity_of: Callable[[IPAddress], int]
    ) -> None:
        self.sink = sink
        self.identity_of = identity_of
        self.errors = 0

    async def StreamAccessLogs(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        owner: tuple[int, bool] | None = None
        async for msg in request_iterator:
            if msg.HasField("identifier"):
                owner = parse_log_name(msg.identifier.log_name)
            for entry in msg.http_logs.log_entry:
                if owner is None:
                    self.errors += 1
                    continue
                try:
                    rec = record(entry, owner[0], owner[1], self.identity_of)
                except ValueError:  # an enum value this build does not know
                    self.errors += 1
                    continue
                self.sink(rec)
        return als_pb2.StreamAccessLogsResponse()


__all__ = ["AccessLogServicer", "L7Record", "format_l7", "parse_log_name", "record"]
