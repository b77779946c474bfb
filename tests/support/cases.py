"""The conformance corpus (../shared/conformance) as typed cases.

Shared by the trace-level tests and the end-to-end runner: both build the
same cluster, apply the same policy steps and check the same probes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .host import CONFORMANCE


@dataclass(frozen=True)
class PortSpec:
    port: int
    protocol: str
    name: str = ""


@dataclass
class Pod:
    namespace: str
    name: str
    labels: dict[str, str]
    ip: str
    ports: list[PortSpec]
    service_account: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class External:
    name: str
    ip: str | None
    entity: str


@dataclass(frozen=True)
class Probe:
    src: str
    dst: str
    port: int | None
    protocol: str
    expect: str
    http: dict[str, Any] | None = None
    kafka: dict[str, Any] | None = None
    icmp_type: int | None = None
    loopback_ignored: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def label(self) -> str:
        extra = ""
        if self.http:
            extra = f" {self.http.get('method')} {self.http.get('path')}"
        if self.kafka:
            extra = f" kafka {self.kafka}"
        port = self.icmp_type if self.port is None else self.port
        return f"{self.src} -> {self.dst} {port}/{self.protocol}{extra}"


@dataclass
class Step:
    number: int
    policies: list[dict[str, Any]]
    namespace_labels: dict[str, dict[str, str]]
    pod_labels: dict[str, dict[str, str]]
    probes: list[Probe]


@dataclass
class Case:
    id: str
    path: Path
    namespaces: dict[str, dict[str, str]]
    pods: dict[str, Pod]
    externals: dict[str, External]
    steps: list[Step]

    @property
    def has_sctp(self) -> bool:
        return any(p.protocol == "SCTP" for s in self.steps for p in s.probes)


def _probe(raw: dict[str, Any]) -> Probe:
    icmp = raw.get("icmp") or {}
    return Probe(
        src=str(raw["from"]),
        dst=str(raw["to"]),
        port=int(raw["port"]) if raw.get("port") is not None else None,
        protocol=str(raw.get("protocol", "TCP")),
        expect=str(raw["expect"]),
        http=raw.get("http"),
        kafka=raw.get("kafka"),
        icmp_type=int(icmp["type"]) if "type" in icmp else None,
        loopback_ignored=bool(raw.get("loopback_ignored", False)),
        raw=raw,
    )


def load_case(path: Path) -> Case:
    doc = yaml.safe_load(path.read_text())
    cluster = doc.get("cluster") or {}
    namespaces = {
        name: dict((spec or {}).get("labels") or {})
        for name, spec in (cluster.get("namespaces") or {}).items()
    }
    pods: dict[str, Pod] = {}
    for raw in list(cluster.get("pods") or []) + list(cluster.get("endpoints") or []):
        ns = raw.get("ns") or raw.get("namespace")
        pod = Pod(
            namespace=ns,
            name=raw["name"],
            labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
            ip=str(raw["ip"]),
            ports=[
                PortSpec(int(p["port"]), str(p.get("protocol", "TCP")), str(p.get("name", "")))
                for p in raw.get("ports") or []
            ],
            service_account=raw.get("serviceAccount"),
        )
        pods[pod.key] = pod
        namespaces.setdefault(ns, {"kubernetes.io/metadata.name": ns})
    externals = {}
    for raw in cluster.get("external") or []:
        entity = raw.get("entity") or ("world" if raw.get("ip") else raw["name"])
        externals[raw["name"]] = External(raw["name"], raw.get("ip"), entity)
    steps: list[Step] = []
    if doc.get("steps"):
        ns_labels: dict[str, dict[str, str]] = {}
        pod_labels: dict[str, dict[str, str]] = {}
        for i, raw in enumerate(doc["steps"]):
            changes = raw.get("cluster_changes") or {}
            for ns, labels in (changes.get("namespace_labels") or {}).items():
                ns_labels.setdefault(ns, {}).update({str(k): str(v) for k, v in labels.items()})
            for pod, labels in (changes.get("pod_labels") or {}).items():
                pod_labels.setdefault(pod, {}).update({str(k): str(v) for k, v in labels.items()})
            steps.append(
                Step(
                    number=int(raw.get("step", i + 1)),
                    policies=list(raw.get("policies_in_effect") or []),
                    namespace_labels={k: dict(v) for k, v in ns_labels.items()},
                    pod_labels={k: dict(v) for k, v in pod_labels.items()},
                    probes=[_probe(p) for p in raw.get("probes") or []],
                )
            )
    else:
        steps.append(
            Step(1, list(doc.get("policies") or []), {}, {}, [_probe(p) for p in doc.get("probes") or []])
        )
    return Case(doc.get("id", path.stem), path, namespaces, pods, externals, steps)


def case_paths() -> list[Path]:
    return sorted(p for p in CONFORMANCE.glob("*/*.yaml") if p.name != "cluster.yaml")


def load_cases() -> list[Case]:
    return [load_case(p) for p in case_paths()]


def pod_in_step(case: Case, key: str, step: Step) -> Pod:
    """The pod with the labels it has at ``step``."""
    pod = case.pods[key]
    labels = dict(pod.labels)
    labels.update(step.pod_labels.get(key, {}))
    return Pod(pod.namespace, pod.name, labels, pod.ip, pod.ports, pod.service_account)


def namespace_labels(case: Case, ns: str, step: Step) -> dict[str, str]:
    labels = dict(case.namespaces.get(ns, {}))
    labels.update(step.namespace_labels.get(ns, {}))
    return labels


def is_world_ip(address: str) -> bool:
    return not ipaddress.ip_address(address).is_private
