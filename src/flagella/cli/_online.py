"""`policy trace` against the running agent's policies and settings."""

from __future__ import annotations

from typing import Any

from flagella.cli._client import call
from flagella.policy.api import PROTOCOL_NAMES
from flagella.policy.trace import TraceQuery


def query_json(q: TraceQuery) -> dict[str, Any]:
    def side(s: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if s.labels is not None:
            out["labels"] = sorted(str(x) for x in s.labels)
        if s.ip is not None:
            out["ip"] = str(s.ip)
        if s.named_ports:
            out["named_ports"] = [
                f"{name}={port}/{PROTOCOL_NAMES.get(proto, 'ANY')}"
                for name, ports in s.named_ports.items()
                for port, proto in ports
            ]
        return out

    out: dict[str, Any] = {"src": side(q.src), "dst": side(q.dst)}
    if q.dport is not None:
        out["dport"] = f"{q.dport[0]}/{q.dport[1].value}"
    if q.http is not None:
        out["http"] = {"method": q.http.method, "path": q.http.path, "host": q.http.host, "headers": dict(q.http.headers)}
    if q.kafka:
        k = q.kafka[0]
        out["kafka"] = {"api_key": k.api_key, "api_version": k.api_version, "client_id": k.client_id, "topics": list(k.topics)}
    return out


def online_trace(
    socket: str | None,
    queries: list[dict[str, Any]],
    output: str,
) -> list[Any]:
    """Answers as JSON objects (``--output json`` / ``--queries``) or text lines."""
    results = list(call(socket, "policy.trace", {"queries": queries}))
    if output == "json":
        return results
    return [_text(r) for r in results]


def _text(r: dict[str, Any]) -> str:
    lines = [f"Tracing identity {r['src_identity']} => identity {r['dst_identity']}"]
    for side in ("egress", "ingress"):
        s = r[side]
        if not s.get("evaluated"):
            lines.append(f"{side.capitalize()}: not a local endpoint, not evaluated")
            continue
        rules = ", ".join(s["rules"]) or "none"
        enforced = "enforced" if s["enforced"] else "not enforced"
        lines.append(f"{side.capitalize()} ({enforced}): {s['verdict']} (rules: {rules})")
    if r.get("l7"):
        lines.append(f"L7 verdict: {r['l7']}")
    lines.append(f"Final verdict: {r['verdict'].upper()}")
    return "\n".join(lines)
