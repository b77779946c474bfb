"""IP/CIDR -> identity: what the kernel's LPM ipcache should hold.

Four sources feed it, most specific winning by longest-prefix match in the
kernel: every local endpoint address (a /32 or /128 to the endpoint's
identity), every host address (identity 1, host), the other nodes' endpoint
addresses and node addresses (learned from the kvstore, `ClusterState`), and
every CIDR a policy names (its CIDR identity). For the same prefix a local
endpoint beats the host, the host beats a remote entry, and a remote entry
beats a policy CIDR. Anything else resolves to world (2) in the kernel,
without an entry. Pure: the agent writes the result to the map.

Cluster mode (`ClusterState`): every node publishes, under a key prefix and on
its lease, one node record (``nodes/<node>``: name, node IPs, pod CIDRs) and
one entry per local endpoint address (``ip/<node>/<addr>`` = its identity, that
identity's label key, the endpoint's named ports).
`ClusterState.replace` takes a full read of that prefix and says what changed;
its `remote_ipcache` maps the other nodes' endpoint addresses to their
identities and their node IPs to ``reserved:remote-node`` (6), so a packet
from another node's pod carries that pod's identity here, and one from
another node itself is neither host nor world; `extras` gives the policy engine the
remote endpoints' addresses and named ports per identity, `node_routes` the pod CIDR
routes via node IPs. `own_entries` is what this
node should have under the prefix. Malformed entries are skipped and named in
``ClusterState.errors``; nothing else of the read is lost.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flagella.errors import InputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOST_IDENTITY = 1
WORLD_IDENTITY = 2
REMOTE_NODE_IDENTITY = 6
#: Identities no endpoint may claim in the kvstore (they would turn a pod into host/world/node).
_UNCLAIMABLE = frozenset({0, HOST_IDENTITY, WORLD_IDENTITY, REMOTE_NODE_IDENTITY})
MAX_IDENTITY = 0xFFFF


def desired_ipcache(
    cidr_identities: Mapping[IPNetwork, int],
    host_addresses: Iterable[IPAddress],
    endpoint_addresses: Iterable[tuple[IPAddress, int]],
    remote: Mapping[IPNetwork, int] | None = None,
) -> dict[IPNetwork, int]:
    """The full ipcache; local endpoints override host, host remote, remote CIDRs."""
    out: dict[IPNetwork, int] = dict(cidr_identities)
    out.update(remote or {})
    for addr in host_addresses:
        out[ipaddress.ip_network(addr)] = HOST_IDENTITY
    for addr, identity in endpoint_addresses:
        out[ipaddress.ip_network(addr)] = identity
    return out


# -- cluster mode: node records and remote endpoints ---------------------------------


def _host_network(addr: IPAddress) -> IPNetwork:
    """``addr``/32 or /128, built from its integer (``ip_network(addr)`` goes through text)."""
    if addr.version == 4:
        return ipaddress.IPv4Network((int(addr), 32))
    return ipaddress.IPv6Network((int(addr), 128))


@dataclass(frozen=True)
class NodeRecord:
    """One node as the kvstore announces it."""

    name: str
    ips: tuple[IPAddress, ...] = ()
    pod_cidrs: tuple[IPNetwork, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {"name": self.name, "ips": [str(a) for a in self.ips], "pod_cidrs": [str(c) for c in self.pod_cidrs]},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> NodeRecord:
        """Parse a node record; `InputError` names ``where`` and the bad field."""
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{where}: not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InputError(f"{where}: expected an object")
        name = doc.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise InputError(f"{where}.name: must be a non-empty string without '/'")
        ips, cidrs = doc.get("ips", []), doc.get("pod_cidrs", [])
        if not isinstance(ips, list) or not isinstance(cidrs, list):
            raise InputError(f"{where}: ips and pod_cidrs must be lists")
        out_ips = []
        for i, ip in enumerate(ips):
            try:
                out_ips.append(ipaddress.ip_address(str(ip)))
            except ValueError:
                raise InputError(f"{where}.ips[{i}]: {ip!r} is not an IP address") from None
        out_cidrs = []
        for i, cidr in enumerate(cidrs):
            try:
                out_cidrs.append(ipaddress.ip_network(str(cidr)))
            except ValueError:
                raise InputError(f"{where}.pod_cidrs[{i}]: {cidr!r} is not a CIDR") from None
        return cls(name, tuple(out_ips), tuple(out_cidrs))


NamedPorts = dict[str, frozenset[tuple[int, int]]]  # name -> {(port, protocol number)}


def _named_ports(doc: object, where: str) -> NamedPorts:
    if not isinstance(doc, dict):
        raise InputError(f"{where}: must be an object of name -> [[port, protocol], ...]")
    out: NamedPorts = {}
    for name, pairs in doc.items():
        if not isinstance(pairs, list):
            raise InputError(f"{where}.{name}: must be a list of [port, protocol]")
        ports = set()
        for i, pair in enumerate(pairs):
            ok = isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in pair
            )
            if not ok or not 1 <= pair[0] <= 65535 or not 0 <= pair[1] <= 255:
                raise InputError(f"{where}.{name}[{i}]: must be [port 1-65535, protocol 0-255]")
            ports.add((pair[0], pair[1]))
        out[str(name)] = frozenset(ports)
    return out


def _identity_value(text: str, where: str) -> tuple[int, str, NamedPorts]:
    """(identity, label key, named ports) of an endpoint entry."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{where}: not JSON: {exc}") from None
    ident = doc.get("identity") if isinstance(doc, dict) else None
    if not isinstance(ident, int) or isinstance(ident, bool) or not 0 < ident <= MAX_IDENTITY:
        raise InputError(f"{where}.identity: must be an identity number 1-{MAX_IDENTITY}")
    if ident in _UNCLAIMABLE:
        raise InputError(f"{where}.identity: {ident} is reserved for hosts, nodes or world")
    labels = doc.get("labels", "")
    if not isinstance(labels, str):
        raise InputError(f"{where}.labels: must be the identity's label key (a string)")
    return ident, labels, _named_ports(doc.get("named_ports", {}), f"{where}.named_ports")


@dataclass(frozen=True)
class ClusterChange:
    """What a read changed: ipcache prefixes to rewrite; remote nodes that came or went."""

    prefixes: frozenset[IPNetwork] = frozenset()
    nodes_added: frozenset[str] = frozenset()
    nodes_removed: frozenset[str] = frozenset()


@dataclass
class ClusterState:
    """The other nodes and their endpoints' addresses, from full reads of the prefix."""

    local_node: str
    prefix: str
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    #: node -> endpoint address -> identity
    endpoints: dict[str, dict[IPAddress, int]] = field(default_factory=dict)
    #: identity -> label key, as the entries that name it announce it
    labels: dict[int, str] = field(default_factory=dict)
    #: endpoint address -> its named ports
    named_ports: dict[IPAddress, NamedPorts] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prefix = self.prefix.rstrip("/")
        self._remote: dict[IPNetwork, int] = self._compute_remote_ipcache()

    def node_key(self, node: str) -> str:
        return f"{self.prefix}/nodes/{node}"

    def ip_key(self, node: str, addr: IPAddress) -> str:
        return f"{self.prefix}/ip/{node}/{addr}"

    def own_entries(
        self, record: NodeRecord, endpoints: Iterable[tuple[IPAddress, int, str, Mapping[str, Iterable[tuple[int, int]]]]]
    ) -> dict[str, str]:
        """The keys and values this node should have under the prefix; ``endpoints`` are
        (address, identity, the identity's label key, the endpoint's named ports)."""
        out = {self.node_key(record.name): record.to_json()}
        for addr, ident, labels, named in endpoints:
            if ident not in _UNCLAIMABLE:
                doc: dict[str, object] = {"identity": ident, "labels": labels}
                if named:
                    doc["named_ports"] = {k: sorted([p, proto] for p, proto in v) for k, v in sorted(named.items())}
                out[self.ip_key(record.name, addr)] = json.dumps(doc, sort_keys=True)
        return out

    def replace(self, pairs: Iterable[tuple[str, str]]) -> ClusterChange:
        """Take a full read of the prefix ((key, value) pairs); return what changed."""
        before_ipc, before_nodes = self._remote, set(self.nodes)
        nodes: dict[str, NodeRecord] = {}
        endpoints: dict[str, dict[IPAddress, int]] = {}
        labels: dict[int, str] = {}
        named_ports: dict[IPAddress, NamedPorts] = {}
        errors: list[str] = []
        base = self.prefix + "/"
        for key, value in pairs:
            if not key.startswith(base):
                continue
            parts = key[len(base):].split("/")
            try:
                if parts[0] == "nodes" and len(parts) == 2:
                    if parts[1] == self.local_node:
                        continue
                    record = NodeRecord.from_json(value, key)
                    if record.name != parts[1]:
                        raise InputError(f"{key}.name: {record.name!r} is not the key's node {parts[1]!r}")
                    nodes[parts[1]] = record
                elif parts[0] == "ip" and len(parts) == 3:
                    if parts[1] == self.local_node:
                        continue
                    try:
                        addr = ipaddress.ip_address(parts[2])
                    except ValueError:
                        raise InputError(f"{key}: {parts[2]!r} is not an IP address") from None
                    ident, label_key, named = _identity_value(value, key)
                    endpoints.setdefault(parts[1], {})[addr] = ident
                    labels.setdefault(ident, label_key)
                    if named:
                        named_ports[addr] = named
                else:
                    raise InputError(f"{key}: unknown key under {self.prefix}")
            except InputError as exc:
                errors.append(str(exc))
        self.nodes, self.endpoints, self.labels, self.errors = nodes, endpoints, labels, errors
        self.named_ports = named_ports
        after = self._remote = self._compute_remote_ipcache()
        changed = {p for p in before_ipc.keys() | after.keys() if before_ipc.get(p) != after.get(p)}
        return ClusterChange(
            frozenset(changed), frozenset(nodes.keys() - before_nodes), frozenset(before_nodes - nodes.keys())
        )

    def remote_ipcache(self) -> dict[IPNetwork, int]:
        """Other nodes' IPs -> remote-node, their endpoints' addresses -> identity.

        Computed once per `replace`; this is a copy."""
        return dict(self._remote)

    def _compute_remote_ipcache(self) -> dict[IPNetwork, int]:
        """See `remote_ipcache`.

        Two nodes claiming one address (a pod moved, the old node's lease has not
        expired yet): the first node name in sort order wins, the same on every node.
        An endpoint address beats a node IP.
        """
        out: dict[IPNetwork, int] = {}
        for name in sorted(self.nodes, reverse=True):
            for addr in self.nodes[name].ips:
                out[_host_network(addr)] = REMOTE_NODE_IDENTITY
        for node in sorted(self.endpoints, reverse=True):
            for addr, ident in self.endpoints[node].items():
                out[_host_network(addr)] = ident
        return out

    def node_routes(self, own_cidrs: Iterable[IPNetwork]) -> dict[IPNetwork, IPAddress]:
        """Pod CIDR -> node IP of its node, for every other node (direct routing).

        The gateway is the node's first IP of the CIDR's family; a CIDR that overlaps
        one of ``own_cidrs`` is left out (it would steal local pods' traffic), and of
        two nodes announcing one CIDR the first in sort order wins.
        """
        own = list(own_cidrs)
        out: dict[IPNetwork, IPAddress] = {}
        for name in sorted(self.nodes, reverse=True):
            record = self.nodes[name]
            for cidr in record.pod_cidrs:
                gateway = next((ip for ip in record.ips if ip.version == cidr.version), None)
                if gateway is None or any(c.version == cidr.version and c.overlaps(cidr) for c in own):
                    continue
                out[cidr] = gateway
        return out

    def extras(self) -> dict[int, tuple[frozenset[IPAddress], NamedPorts]]:
        """identity -> (addresses, named ports) of its remote endpoints, for the policy
        engine (ipBlock peers select pods by address; named ports resolve per peer)."""
        addrs: dict[int, set[IPAddress]] = {}
        named: dict[int, dict[str, set[tuple[int, int]]]] = {}
        for net, ident in self.remote_ipcache().items():
            if ident == REMOTE_NODE_IDENTITY:
                continue
            addr = net.network_address
            addrs.setdefault(ident, set()).add(addr)
            for name, ports in self.named_ports.get(addr, {}).items():
                named.setdefault(ident, {}).setdefault(name, set()).update(ports)
        return {
            ident: (frozenset(a), {k: frozenset(v) for k, v in named.get(ident, {}).items()})
            for ident, a in addrs.items()
        }

    def identities(self) -> dict[int, str]:
        """The identities remote endpoints hold, with the label key their entries announce
        (a hint to tell a stale cache by: the identity store stays the authority)."""
        return {ident: self.labels.get(ident, "") for eps in self.endpoints.values() for ident in eps.values()}


__all__ = [
    "HOST_IDENTITY",
    "REMOTE_NODE_IDENTITY",
    "ClusterChange",
    "ClusterState",
    "NodeRecord",
    "desired_ipcache",
]
