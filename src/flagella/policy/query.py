"""Parse trace queries (CLI flags or JSON lines) into `TraceQuery` objects; pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from flagella.errors import InputError
from flagella.policy.api import KAFKA_API_KEYS, Protocol
from flagella.policy.l7 import HTTPRequest, KafkaRequest
from flagella.policy.labels import LabelSet, parse_label
from flagella.policy.trace import Side, TraceQuery, default_namespace

_PROTOCOLS = {p.value.upper(): p for p in Protocol}


def parse_port(text: str, field: str = "dport") -> tuple[int, Protocol]:
    """``80/TCP``, ``8/ICMP``, ``53`` (TCP)."""
    port_s, _, proto_s = str(text).partition("/")
    proto = _PROTOCOLS.get((proto_s or "TCP").upper())
    if proto is None:
        raise InputError(f"{field}: unknown protocol {proto_s!r} (TCP, UDP, SCTP, ICMP, ICMPv6, ANY)")
    try:
        port = int(port_s)
    except ValueError:
        raise InputError(f"{field}: port {port_s!r} is not a number") from None
    limit = 255 if proto in (Protocol.ICMP, Protocol.ICMPV6) else 65535
    if not 0 <= port <= limit:
        raise InputError(f"{field}: port {port} out of range 0-{limit}")
    return port, proto


def parse_label_list(value: object, field: str) -> LabelSet:
    if isinstance(value, str):
        items: Iterable[object] = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        items = value
    elif isinstance(value, Mapping):
        items = [f"{k}={v}" for k, v in value.items()]
    else:
        raise InputError(f"{field}: expected a comma-separated string, a list or a mapping")
    try:
        return default_namespace(frozenset(parse_label(str(i)) for i in items))
    except InputError as exc:
        raise InputError(f"{field}: {exc}") from None


def parse_ip(value: object, field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise InputError(f"{field}: {value!r} is not an IP address") from None


def parse_named_ports(value: object, field: str) -> dict[str, frozenset[tuple[int, int]]]:
    pairs: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    elif isinstance(value, list):
        for item in value:
            name, sep, port = str(item).partition("=")
            if not sep:
                raise InputError(f"{field}: {item!r} is not NAME=PORT/PROTO")
            pairs.append((name, port))
    elif value is not None:
        raise InputError(f"{field}: expected a mapping or a list of NAME=PORT/PROTO")
    out: dict[str, set[tuple[int, int]]] = {}
    for name, port_s in pairs:
        number, proto = parse_port(port_s, f"{field}.{name}")
        out.setdefault(name, set()).add((number, proto.number))
    return {k: frozenset(v) for k, v in out.items()}


def parse_side(obj: object, field: str) -> Side:
    if not isinstance(obj, Mapping):
        raise InputError(f"{field}: expected an object with labels and/or ip")
    labels = obj.get("labels")
    ip = obj.get("ip")
    if labels in (None, "", []) and ip in (None, ""):
        raise InputError(f"{field}: needs labels or ip")
    return Side(
        labels=parse_label_list(labels, f"{field}.labels") if labels not in (None, "", []) else None,
        ip=parse_ip(ip, f"{field}.ip") if ip not in (None, "") else None,
        named_ports=parse_named_ports(obj.get("named_ports"), f"{field}.named_ports"),
    )


def parse_kafka(obj: Mapping[str, Any], field: str = "kafka") -> KafkaRequest:
    key = obj.get("api_key", obj.get("apiKey"))
    if key is None:
        raise InputError(f"{field}.api_key: required")
    if isinstance(key, int) or str(key).lstrip("-").isdigit():
        api_key = int(key)
    else:
        found = KAFKA_API_KEYS.get(str(key).lower())
        if found is None:
            raise InputError(f"{field}.api_key: unknown Kafka api key {key!r}")
        api_key = found
    version = obj.get("api_version", obj.get("apiVersion", 0))
    try:
        api_version = int(version)
    except (TypeError, ValueError):
        raise InputError(f"{field}.api_version: {version!r} is not an integer") from None
    topic = obj.get("topic")
    topics = obj.get("topics")
    if topics is None:
        topics = [topic] if topic else []
    return KafkaRequest(
        api_key=api_key,
        api_version=api_version,
        client_id=str(obj.get("client_id", obj.get("clientID", "")) or ""),
        topics=tuple(str(t) for t in topics),
    )


def parse_headers(items: Iterable[str], field: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = str(item).partition(":")
        if not sep or not name.strip():
            raise InputError(f"{field}: {item!r} is not 'Name: value' (the colon is required)")
        out[name.strip()] = value.strip()
    return out


def parse_http(obj: Mapping[str, Any], field: str = "http") -> HTTPRequest:
    headers = obj.get("headers") or {}
    if isinstance(headers, Mapping):
        hdrs = {str(k): str(v) for k, v in headers.items()}
    else:
        hdrs = parse_headers(headers, f"{field}.headers")
    return HTTPRequest(
        method=str(obj.get("method", "GET")),
        path=str(obj.get("path", "/")),
        host=str(obj.get("host", "")),
        headers=hdrs,
    )


def parse_query(obj: object) -> TraceQuery:
    if not isinstance(obj, Mapping):
        raise InputError("query: expected a JSON object")
    dport = obj.get("dport")
    http = obj.get("http")
    kafka = obj.get("kafka")
    if http is not None and not isinstance(http, Mapping):
        raise InputError("http: expected an object")
    if kafka is not None and not isinstance(kafka, Mapping):
        raise InputError("kafka: expected an object")
    return TraceQuery(
        src=parse_side(obj.get("src"), "src"),
        dst=parse_side(obj.get("dst"), "dst"),
        dport=parse_port(str(dport)) if dport not in (None, "") else None,
        http=parse_http(http) if http is not None else None,
        kafka=(parse_kafka(kafka),) if kafka is not None else (),
    )
