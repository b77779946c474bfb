"""Labels, label sets and the security-relevant label filter.

A label is ``source:key=value``. The source says who set it: ``k8s`` (pod
and namespace labels), ``reserved`` (identities Flagella defines: host,
world, init...), ``cidr`` (CIDR identities), ``container``, ``unspec``, and
``any``, which only appears in selectors and matches every source.

An endpoint's identity is the set of its *security-relevant* labels. The
filter follows Cilium 1.1 (spec 1.6): a list of prefixes, each a regex
matched at the start of the key, optionally restricted to a source, either
including or ignoring. A label is kept when the longest matching include
is longer than the shortest matching ignore, or, when the user configured
no include at all, when no ignore matches it.

Labels the agent owns: the namespace, the namespace's labels, the service
account and the cluster are facts the agent derives from where a pod runs,
and policies trust them (a ``namespaceSelector`` matches namespace labels).
A pod must not claim them. `check_pod_labels` rejects a user-supplied key
the agent owns (the CLI and API paths), and `k8s_labels` drops any that
reach it anyway and sets the derived ones itself (the overwrite a
Kubernetes watcher needs: it relays whatever the pod spec says).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flagella.errors import InputError
from flagella.policy.api._parse import is_label_key, is_label_value

SOURCES = frozenset({"k8s", "reserved", "any", "cidr", "container", "unspec", "mesos"})

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
#: Set by the agent on a pod whose Istio sidecar enforces its inbound HTTP (spec 6.6).
ISTIO_SIDECAR_LABEL = "io.cilium.k8s.policy.istiosidecarproxy"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
#: Every key under this prefix is derived by the agent (namespace labels,
#: service account, cluster, and whatever Cilium adds there later).
AGENT_PREFIX = "io.cilium.k8s."


def is_agent_owned(key: str) -> bool:
    """True for a label key only the agent may set (see the module docstring)."""
    return key == NAMESPACE_LABEL or key.startswith(AGENT_PREFIX)


def check_pod_labels(labels: Mapping[str, str], field: str) -> None:
    """Reject keys the agent owns and keys or values Kubernetes would reject."""
    for key, value in labels.items():
        if is_agent_owned(key):
            raise InputError(
                f"{field}: label key {key!r} is reserved: the agent sets it from the pod's "
                "namespace, namespace labels and service account"
            )
        if not is_label_key(key):
            raise InputError(
                f"{field}: invalid label key {key!r}: must be [DNS subdomain/]name, the name "
                "at most 63 of [A-Za-z0-9-_.] beginning and ending alphanumeric"
            )
        if not is_label_value(value):
            raise InputError(
                f"{field}: invalid value {value!r} for label {key!r}: empty or at most 63 of "
                "[A-Za-z0-9-_.] beginning and ending alphanumeric"
            )


@dataclass(frozen=True, order=True)
class Label:
    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}"


LabelSet = frozenset[Label]


def parse_label(text: str, default_source: str = "k8s") -> Label:
    """Parse ``source:key=value`` (source and value optional).

    ``$host`` is short for ``reserved:host``. A prefix before the first ``:``
    that is not a known source is part of the key.
    """
    text = text.strip()
    if not text:
        raise InputError("empty label")
    if text == "$host":
        return Label("reserved", "host")
    key, _, value = text.partition("=")
    source = default_source
    head, sep, tail = key.partition(":")
    if sep and head in SOURCES:
        source, key = head, tail
    if not key:
        raise InputError(f"label {text!r}: empty key")
    return Label(source, key, value)


def parse_labels(text: str, default_source: str = "k8s") -> LabelSet:
    """Parse a comma-separated list of labels."""
    return frozenset(parse_label(part, default_source) for part in text.split(",") if part.strip())


def k8s_labels(
    pod_labels: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str] | None = None,
    service_account: str | None = None,
    cluster: str | None = "default",
    istio_sidecar: bool = False,
) -> LabelSet:
    """The labels Cilium's Kubernetes integration gives a pod (spec 1.6).

    Keys the agent owns are dropped from ``pod_labels`` and derived from the
    other arguments, whatever the pod said.
    """
    labels = {Label("k8s", k, v) for k, v in pod_labels.items() if not is_agent_owned(k)}
    labels.add(Label("k8s", NAMESPACE_LABEL, namespace))
    for k, v in (namespace_labels or {}).items():
        if not is_agent_owned(k):
            labels.add(Label("k8s", NAMESPACE_LABELS_PREFIX + k, v))
    if service_account:
        labels.add(Label("k8s", SERVICE_ACCOUNT_LABEL, service_account))
    if cluster:
        labels.add(Label("k8s", CLUSTER_LABEL, cluster))
    if istio_sidecar:
        labels.add(Label("k8s", ISTIO_SIDECAR_LABEL, "true"))
    return frozenset(labels)


def reserved(name: str) -> LabelSet:
    return frozenset({Label("reserved", name)})


@dataclass(frozen=True)
class LabelPrefix:
    """One entry of the security-relevant label filter."""

    prefix: str
    source: str = ""
    ignore: bool = False

    def match_length(self, label: Label) -> int:
        """Length of the prefix when it matches ``label``, else 0."""
        if self.source and self.source != label.source:
            return 0
        return len(self.prefix) if re.match(self.prefix, label.key) else 0


DEFAULT_LABEL_PREFIXES: tuple[LabelPrefix, ...] = (
    LabelPrefix("reserved:", ignore=False),
    LabelPrefix(re.escape(NAMESPACE_LABEL)),
    LabelPrefix(re.escape(NAMESPACE_LABELS_PREFIX.rstrip("."))),
    LabelPrefix("io.kubernetes", ignore=True),
    LabelPrefix(".*kubernetes.io", ignore=True),
    LabelPrefix("pod-template-generation", ignore=True),
    LabelPrefix("pod-template-hash", ignore=True),
    LabelPrefix("controller-revision-hash", ignore=True),
    LabelPrefix("annotation.cilium.io/", ignore=True),
    LabelPrefix("annotation.cilium-identity", ignore=True),
    LabelPrefix("annotation.sidecar.istio.io", ignore=True),
)


@dataclass(frozen=True)
class LabelFilter:
    """Keeps the security-relevant labels of an endpoint.

    ``whitelist`` is True when the user configured include prefixes of their
    own; labels then need an include to be kept.
    """

    prefixes: tuple[LabelPrefix, ...] = DEFAULT_LABEL_PREFIXES
    whitelist: bool = False

    @classmethod
    def from_config(cls, entries: Iterable[Mapping[str, object]]) -> LabelFilter:
        """Build from Cilium's label-prefix file format ``valid-prefixes`` entries."""
        user = []
        for i, entry in enumerate(entries):
            prefix = entry.get("prefix")
            if not isinstance(prefix, str) or not prefix:
                raise InputError(f"valid-prefixes[{i}].prefix: must be a non-empty string")
            try:
                re.compile(prefix)
            except re.error as exc:
                raise InputError(f"valid-prefixes[{i}].prefix: invalid regex: {exc}") from None
            user.append(
                LabelPrefix(prefix, str(entry.get("source") or ""), bool(entry.get("invert")))
            )
        whitelist = any(not p.ignore for p in user)
        return cls(DEFAULT_LABEL_PREFIXES[:3] + tuple(user), whitelist)

    @classmethod
    def from_strings(cls, specs: Iterable[str]) -> LabelFilter:
        """``--labels`` style: ``[!][source:]prefix`` entries."""
        entries = []
        for spec in specs:
            invert = spec.startswith("!")
            spec = spec.removeprefix("!")
            source, sep, prefix = spec.partition(":")
            if not sep or source not in SOURCES:
                source, prefix = "", spec
            entries.append({"prefix": prefix, "source": source, "invert": invert})
        return cls.from_config(entries)

    def keep(self, label: Label) -> bool:
        if label.source == "reserved":
            return True
        included = 0
        ignored = 0
        for p in self.prefixes:
            n = p.match_length(label)
            if not n:
                continue
            if p.ignore:
                ignored = n if ignored == 0 else min(ignored, n)
            else:
                included = max(included, n)
        if not self.whitelist and ignored == 0:
            return True
        return included > ignored

    def filter(self, labels: Iterable[Label]) -> LabelSet:
        return frozenset(label for label in labels if self.keep(label))
