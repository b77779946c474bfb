"""Agent settings: typed, grouped by concern, validated once.

Read from a YAML or JSON file (``flagella agent --config FILE``) whose keys
mirror these groups, e.g.::

    state_dir: /var/run/flagella
    network: {ipv4_cidr: 10.244.0.0/24, ipv6_cidr: "fd00:10:244::/112"}
    policy: {enforcement: default, legacy_host_allows_world: false}
    conntrack: {tcp_established_s: 21600}
    api: {max_request_bytes: 16777216, idle_timeout_s: 30, max_connections: 0}
    kvstore: {backend: etcd, endpoints: ["http://127.0.0.1:2379"], lease_ttl_s: 15}
    proxy: {enabled: true, ingress_port: 15001, egress_port: 15002, start_at_agent_start: false}
    k8s: {kubeconfig: /etc/kubernetes/flagella.kubeconfig, node_name: node-a,
          require_ipv4_pod_cidr: true, container_runtime: auto}
    istio: {enabled: true, trust_domain: cluster.local, init_policy: {dns_ports: [53], namespaces: [istio-system]}}
    cni: {conf_dir: /etc/cni/net.d, mtu: 0}

Unknown keys are errors that name the key.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from flagella.endpoint.regeneration import RegenerationSettings
from flagella.errors import InputError
from flagella.identity import Backend
from flagella.istio.workload import IstioSettings
from flagella.k8s.translate import K8sSettings
from flagella.policy.resolver import PolicySettings
from flagella.proxy.ports import ProxySettings


@dataclass(frozen=True)
class NetworkSettings:
    ipv4_cidr: str = "10.244.0.0/16"
    ipv6_cidr: str = "fd00:10:244::/64"
    mtu: int = 1500
    #: Bytes of encapsulation overhead; 0 = no tunnel (routes keep the device MTU).
    tunnel_overhead: int = 0
    #: Cluster mode: route every other node's pod CIDRs via its node IP, as the node
    #: records in the kvstore announce them (Cilium's ``auto-direct-node-routes``; the
    #: nodes share a layer-2 network).
    auto_direct_node_routes: bool = False


@dataclass(frozen=True)
class ConntrackSettings:
    tcp_established_s: int = 21600
    tcp_syn_s: int = 60
    non_tcp_s: int = 60
    closing_s: int = 10
    gc_interval_s: float = 60.0
    gc_interval_non_tcp_s: float = 15.0


@dataclass(frozen=True)
class ControllerSettings:
    sync_interval_s: float = 10.0


@dataclass(frozen=True)
class ApiSettings:
    """Limits of the agent's unix-socket API (see `flagella.agent.server`)."""

    #: Largest request line, in bytes. 16 MiB holds ~40,000 typical rules; a bigger
    #: request is answered with an error (nothing of it is applied).
    max_request_bytes: int = 16 * 1024 * 1024
    #: Seconds a connection gets to deliver its whole request, and to take its answer.
    idle_timeout_s: float = 30.0
    #: Concurrent connections; 0 derives the cap from RLIMIT_NOFILE (`connection_cap`).
    max_connections: int = 0
    #: Seconds a ``policy.trace`` request may run before it is abandoned with an error.
    trace_timeout_s: float = 60.0


@dataclass(frozen=True)
class KvstoreSettings:
    """Where identities live: ``local`` (SQLite in the state dir) or ``etcd`` (cluster-wide)."""

    backend: str = "local"
    #: etcd client URLs (``http://HOST:PORT``, the v3 JSON gateway); tried in order.
    endpoints: tuple[str, ...] = ()
    #: TTL of this node's lease; its identity references vanish this long after it dies.
    lease_ttl_s: int = 15
    #: Seconds one etcd request may take before etcd counts as unreachable.
    timeout_s: float = 2.0
    #: Key prefix shared by the cluster's agents.
    prefix: str = "flagella/identities"
    #: This node's name in reference keys and its node record; default: the host name.
    node: str = ""
    #: Key prefix of the cluster state: node records and endpoint ipcache entries.
    cluster_prefix: str = "flagella/cluster"
    #: Seconds between reads of the cluster state (and publishing this node's part).
    sync_interval_s: float = 1.0
    #: Seconds between identity garbage collections (identities of dead agents).
    gc_interval_s: float = 60.0

    @property
    def node_name(self) -> str:
        import socket

        return self.node or socket.gethostname()


def build_identity_backend(kv: KvstoreSettings) -> Backend | None:
    """The identity `Backend` the settings select; None for the local (SQLite) default."""
    if kv.backend == "local":
        return None
    from flagella.identity import EtcdBackend

    return EtcdBackend(
        kv.endpoints, node=kv.node_name, prefix=kv.prefix,
        lease_ttl_s=kv.lease_ttl_s, timeout_s=kv.timeout_s,
    )


@dataclass(frozen=True)
class CniSettings:
    """The CNI plugin's side of the agent (`flagella.agent.cni`)."""

    #: Where the agent writes its network configuration for the container runtime
    #: (``/etc/cni/net.d`` on a node); empty: write none.
    conf_dir: str = ""
    #: The file's name; ``00-`` sorts it first, so runtimes pick it.
    conf_name: str = "00-flagella.conflist"
    #: The network's ``name`` in the configuration.
    network_name: str = "flagella"
    #: Pod interface MTU written into the configuration; 0: none, and each ADD takes
    #: the MTU of the host's default-route device (the node's ``network.mtu`` without one).
    mtu: int = 0


#: File descriptors kept for the agent's own use (maps, pins, netlink, state files).
RESERVED_FDS = 256
#: Largest derived connection cap: each connection may buffer a whole request.
MAX_DERIVED_CONNECTIONS = 1024


def connection_cap(api: ApiSettings, nofile_soft: int) -> int:
    """How many API connections the agent serves at once.

    Derived from the soft RLIMIT_NOFILE: what is left after `RESERVED_FDS` (at least
    a quarter of the limit), at most `MAX_DERIVED_CONNECTIONS`. An explicit
    ``max_connections`` is honoured up to that same fd budget, never beyond it.
    """
    budget = max(1, nofile_soft - max(RESERVED_FDS, nofile_soft // 4))
    if api.max_connections > 0:
        return min(api.max_connections, budget)
    return min(budget, MAX_DERIVED_CONNECTIONS)


@dataclass(frozen=True)
class AgentSettings:
    state_dir: str = "/var/run/flagella"
    socket: str = ""  # default: <state_dir>/flagella.sock
    bpf_dir: str = "/sys/fs/bpf/flagella"
    #: How programs are attached to pods: ``auto`` (tcx links where the kernel has them,
    #: else clsact), ``tcx`` or ``tc`` (clsact filters) to force one.
    attach_mode: str = "auto"
    #: Pod-to-pod traffic on this node whose verdict both ends have cached goes from the
    #: source's program straight into the destination pod (bpf_redirect_peer), skipping
    #: the host stack; everything else takes the stack path (see bpf/flagella.c).
    local_delivery: bool = True
    metrics_addr: str = "127.0.0.1:9962"
    trace_events: bool = False
    label_prefixes: tuple[str, ...] = ()
    #: Put before every pod's netns name (``<prefix><namespace>_<name>``): several
    #: clusters' nodes on one machine (tests, demos) never claim each other's pods.
    pod_netns_prefix: str = ""
    network: NetworkSettings = field(default_factory=NetworkSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    conntrack: ConntrackSettings = field(default_factory=ConntrackSettings)
    controllers: ControllerSettings = field(default_factory=ControllerSettings)
    regeneration: RegenerationSettings = field(default_factory=RegenerationSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    kvstore: KvstoreSettings = field(default_factory=KvstoreSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    #: The Kubernetes watchers (`flagella.k8s`); off unless a kubeconfig or in-cluster is set.
    k8s: K8sSettings = field(default_factory=K8sSettings)
    istio: IstioSettings = field(default_factory=IstioSettings)
    cni: CniSettings = field(default_factory=CniSettings)

    @property
    def socket_path(self) -> str:
        return self.socket or str(Path(self.state_dir) / "flagella.sock")

    @property
    def xds_socket_path(self) -> str:
        return self.proxy.xds_socket or str(Path(self.state_dir) / "xds.sock")

    def validate(self) -> AgentSettings:
        try:
            ipaddress.IPv4Network(self.network.ipv4_cidr)
        except ValueError as exc:
            raise InputError(f"network.ipv4_cidr: {exc}") from None
        if self.network.ipv6_cidr:
            try:
                ipaddress.IPv6Network(self.network.ipv6_cidr)
            except ValueError as exc:
                raise InputError(f"network.ipv6_cidr: {exc}") from None
        if self.policy.enforcement not in ("default", "always", "never"):
            raise InputError("policy.enforcement: must be default, always or never")
        if self.policy.allow_localhost not in ("always", "policy"):
            raise InputError("policy.allow_localhost: must be always or policy")
        if not 576 <= self.network.mtu <= 65520:
            raise InputError("network.mtu: must be 576-65520")
        if not 0 <= self.network.tunnel_overhead < 200:
            raise InputError("network.tunnel_overhead: must be 0-199")
        host, sep, port = self.metrics_addr.rpartition(":")
        if self.metrics_addr and (not sep or not port.isdigit()):
            raise InputError("metrics_addr: must be HOST:PORT (or empty to disable)")
        for name in ("tcp_established_s", "tcp_syn_s", "non_tcp_s", "closing_s"):
            if getattr(self.conntrack, name) <= 0:
                raise InputError(f"conntrack.{name}: must be positive")
        if not re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,15})?", self.pod_netns_prefix):
            raise InputError("pod_netns_prefix: at most 16 of [A-Za-z0-9_.-], starting with a letter or digit")
        if self.attach_mode not in ("auto", "tcx", "tc"):
            raise InputError("attach_mode: must be auto, tcx or tc")
        if self.controllers.sync_interval_s <= 0:
            raise InputError("controllers.sync_interval_s: must be positive")
        for name in ("completion_timeout_s", "backoff_initial_s", "backoff_max_s"):
            if getattr(self.regeneration, name) <= 0:
                raise InputError(f"regeneration.{name}: must be positive")
        if not 1024 <= self.api.max_request_bytes <= 1 << 30:
            raise InputError("api.max_request_bytes: must be 1024 to 1073741824")
        for name in ("idle_timeout_s", "trace_timeout_s"):
            if not 0 < getattr(self.api, name) < float("inf"):
                raise InputError(f"api.{name}: must be a positive number of seconds")
        if self.api.max_connections < 0:
            raise InputError("api.max_connections: must be 0 (derived) or positive")
        kv = self.kvstore
        if kv.backend not in ("local", "etcd"):
            raise InputError("kvstore.backend: must be local or etcd")
        if kv.backend == "etcd" and not kv.endpoints:
            raise InputError("kvstore.endpoints: etcd needs at least one http://HOST:PORT")
        for i, ep in enumerate(kv.endpoints):
            host, sep, port = ep.removeprefix("http://").rpartition(":")
            if not ep.startswith("http://") or not sep or not host or not port.isdigit():
                raise InputError(f"kvstore.endpoints[{i}]: {ep!r} must be http://HOST:PORT")
        if kv.lease_ttl_s < 2:
            raise InputError("kvstore.lease_ttl_s: must be at least 2")
        if not 0 < kv.timeout_s < float("inf"):
            raise InputError("kvstore.timeout_s: must be a positive number of seconds")
        if "/" in kv.node:
            raise InputError("kvstore.node: must not contain '/'")
        if not kv.cluster_prefix.strip("/"):
            raise InputError("kvstore.cluster_prefix: must not be empty")
        if kv.cluster_prefix.rstrip("/") == kv.prefix.rstrip("/"):
            raise InputError("kvstore.cluster_prefix: must differ from kvstore.prefix")
        for name in ("sync_interval_s", "gc_interval_s"):
            if not 0 < getattr(kv, name) < float("inf"):
                raise InputError(f"kvstore.{name}: must be a positive number of seconds")
        if self.cni.mtu and not 576 <= self.cni.mtu <= 65520:
            raise InputError("cni.mtu: must be 0 (the host's route MTU) or 576-65520")
        if "/" in self.cni.conf_name or not self.cni.conf_name.endswith(".conflist"):
            raise InputError("cni.conf_name: must be a file name ending in .conflist")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.cni.network_name):
            raise InputError("cni.network_name: must be letters, digits, '_', '.', '-'")
        self.proxy.validate()
        self.k8s.validate()
        if self.k8s.ipv6_cluster_alloc_cidr and not self.network.ipv6_cidr:
            # Node IPv6 ranges derived from it would have no pod range to live in.
            raise InputError("k8s.ipv6_cluster_alloc_cidr: needs IPv6 pods (network.ipv6_cidr is empty)")
        return self


def _build(cls: Any, data: Mapping[str, Any], path: str) -> Any:
    if not isinstance(data, Mapping):
        raise InputError(f"{path or 'settings'}: expected a mapping")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = known.get(str(key).replace("-", "_"))
        where = f"{path}.{key}" if path else str(key)
        if f is None:
            raise InputError(f"{where}: unknown setting")
        default = getattr(cls(), f.name)
        if is_dataclass(default):
            kwargs[f.name] = _build(type(default), value, where)
        elif isinstance(default, tuple):
            if not isinstance(value, list):
                raise InputError(f"{where}: expected a list")
            item = type(default[0]) if default and isinstance(default[0], int) else str
            if item is int and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise InputError(f"{where}: expected a list of numbers")
            kwargs[f.name] = tuple(item(v) for v in value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise InputError(f"{where}: expected true or false")
            kwargs[f.name] = value
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{where}: expected a number")
            kwargs[f.name] = type(default)(value)
        else:
            kwargs[f.name] = str(value)
    return cls(**kwargs)


def load_settings(path: str | Path | None, **overrides: Any) -> AgentSettings:
    data: Mapping[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise InputError(f"settings file: {exc}") from None
        try:
            loaded = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise InputError(f"settings file {path}: {exc}") from None
        data = loaded or {}
    settings: AgentSettings = _build(AgentSettings, data, "")
    clean: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):  # a group: override only the fields given
            group = {k: v for k, v in value.items() if v is not None}
            if group:
                clean[key] = replace(getattr(settings, key), **group)
        elif value is not None:
            clean[key] = value
    if clean:
        settings = replace(settings, **clean)
    return settings.validate()
