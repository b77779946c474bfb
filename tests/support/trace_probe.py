"""Turn a conformance probe into a trace query."""

from __future__ import annotations

import ipaddress

from flagella.policy.api import Protocol
from flagella.policy.l7 import HTTPRequest, KafkaRequest
from flagella.policy.labels import Label, k8s_labels
from flagella.policy.trace import Side, TraceQuery

from .cases import Case, Pod, Probe, Step, namespace_labels, pod_in_step

KAFKA_KEYS = {"produce": 0, "fetch": 1, "offsets": 2, "metadata": 3, "apiversions": 18}
#: What a client doing the role sends for one topic.
KAFKA_ROLE_REQUESTS = {"produce": (3, 0), "consume": (3, 1)}

PROTOCOLS = {p.value.upper(): p for p in Protocol}


def pod_side(case: Case, pod: Pod, step: Step) -> Side:
    labels = k8s_labels(
        pod.labels,
        pod.namespace,
        namespace_labels(case, pod.namespace, step),
        pod.service_account,
        cluster="default" if pod.service_account else None,
    )
    named: dict[str, set[tuple[int, int]]] = {}
    for p in pod.ports:
        if p.name:
            named.setdefault(p.name, set()).add((p.port, PROTOCOLS[p.protocol.upper()].number))
    return Side(
        labels=labels,
        ip=ipaddress.ip_address(pod.ip),
        named_ports={k: frozenset(v) for k, v in named.items()},
    )


def side(case: Case, name: str, step: Step) -> Side:
    if name in case.pods:
        return pod_side(case, pod_in_step(case, name, step), step)
    if name.startswith("ip:"):
        return Side(ip=ipaddress.ip_address(name[3:]))
    ext = case.externals.get(name)
    if ext is not None and ext.ip:
        return Side(ip=ipaddress.ip_address(ext.ip))
    entity = ext.entity if ext is not None else name
    return Side(labels=frozenset({Label("reserved", entity)}))


def kafka_requests(spec: dict[str, object]) -> tuple[KafkaRequest, ...]:
    topic = str(spec.get("topic", ""))
    topics = (topic,) if topic else ()
    if "role" in spec:
        keys = KAFKA_ROLE_REQUESTS[str(spec["role"]).lower()]
    else:
        keys = (KAFKA_KEYS[str(spec["apiKey"]).lower()],)
    return tuple(KafkaRequest(api_key=k, topics=topics) for k in keys)


def query(case: Case, probe: Probe, step: Step) -> TraceQuery:
    proto = PROTOCOLS[probe.protocol.upper()]
    port = probe.icmp_type if probe.port is None else probe.port
    http = None
    if probe.http:
        http = HTTPRequest(
            method=str(probe.http.get("method", "GET")),
            path=str(probe.http.get("path", "/")),
            headers=dict(
                h.split(": ", 1) if ": " in h else (h, "")
                for h in probe.http.get("headers") or []
            ),
        )
    return TraceQuery(
        src=side(case, probe.src, step),
        dst=side(case, probe.dst, step),
        dport=(port, proto) if port is not None else None,
        http=http,
        kafka=kafka_requests(probe.kafka) if probe.kafka else (),
    )
