"""The datapath as the agent sees it: one narrow interface, two implementations.

`Datapath` is everything the agent asks of the kernel: pods (netns + veth),
program attachment, and the maps as dictionaries of plain values. The
kernel implementation (`flagella.datapath.kernel`) uses bcc, bpf(2) and
netlink; `MemoryDatapath` is the in-memory twin the fast tests use. Both
are checked by the same agent tests; the kernel one is also checked with
real traffic.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Protocol

from flagella.datapath.entries import EndpointRow, PolicyKey, PolicyValue
from flagella.errors import InputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def pod_netns_name(namespace: str, name: str, prefix: str = "") -> str:
    """The netns of pod ``namespace/name`` (both DNS labels: no ``_``); distinct pods get
    distinct names.

    ``<prefix><namespace>_<name>``, or, when that exceeds 64 characters (a netns name's
    limit here), both truncated plus ``__`` and a hash of the pair: two underscores, so a
    long name never equals a short one. ``prefix`` (the agent's ``pod_netns_prefix``, at
    most 16 characters) keeps the pods of several clusters on one machine apart."""
    short = f"{prefix}{namespace}_{name}"
    if len(short) <= 64:
        return short
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:16]
    keep = (64 - len(prefix) - 19) // 2
    return f"{prefix}{namespace[:keep]}_{name[:keep]}__{digest}"


@dataclass(frozen=True)
class PodInfo:
    netns: str
    host_ifname: str
    ifindex: int
    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    pod_ifname: str = "eth0"
    pod_mac: str = ""


@dataclass(frozen=True)
class CTRow:
    ep_id: int
    egress: bool
    proto: int
    saddr: IPAddress
    daddr: IPAddress
    sport: int
    dport: int
    expires_ns: int
    packets: int
    bytes: int
    flags: int


@dataclass(frozen=True)
class Counters:
    packets: int
    bytes: int


class Datapath(Protocol):
    @property
    def endpoints(self) -> MutableMapping[int, EndpointRow]:
        """ifindex -> endpoint row."""
        ...

    @property
    def policy(self) -> MutableMapping[PolicyKey, PolicyValue]:
        """Policy key -> verdict/proxy port (reads drop the counters)."""
        ...

    @property
    def ipcache(self) -> MutableMapping[IPNetwork, int]:
        """Prefix -> identity."""
        ...

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def ensure_pod(
        self, name: str, ipv4: ipaddress.IPv4Address, ipv6: ipaddress.IPv6Address | None,
        ifname: str = "eth0", mtu: int | None = None,
    ) -> PodInfo:
        """Plumb pod ``name`` (its pod end named ``ifname``; ``mtu`` None: the node's)."""
        ...
    def check_pod_name(self, name: str) -> None:
        """Raise an `InputError` when a netns or host veth of this name already exists."""
        ...

    def adopt_netns(self, name: str, path: str, ifname: str) -> None:
        """Name a container runtime's namespace ``path`` ``name`` for `ensure_pod`; raise an
        `InputError` when ``name`` is taken, ``path`` already holds a pod or is the agent's
        own namespace, or ``ifname`` exists in it."""
        ...

    def host_route_mtu(self) -> int | None:
        """MTU of the host's default route, None without one."""
        ...

    def remove_pod(self, name: str) -> None: ...
    def list_pods(self) -> list[PodInfo]: ...
    def host_addresses(self) -> list[IPAddress]: ...
    def set_node_routes(self, routes: dict[IPNetwork, IPAddress]) -> None:
        """Routes to other nodes' pod CIDRs (CIDR -> node IP) become exactly ``routes``."""
        ...

    def attach(self, ifindex: int) -> list[str]:
        """Make both programs run on ``ifindex`` (check and repair); return the programs
        (``from_pod``, ``to_pod``) that were missing and are attached now."""
        ...

    def detach(self, ifindex: int) -> None: ...

    def delete_policy_entries(self, keys: Collection[PolicyKey]) -> int:
        """Delete these policy entries (absent ones are skipped), in as few writes as the
        map allows; return how many were present."""
        ...

    def bump_generation(self) -> None:
        """Invalidate cached verdicts; called after every write of the three maps above."""
        ...

    def policy_counters(self, ep_id: int) -> dict[PolicyKey, tuple[PolicyValue, Counters]]: ...
    def ct_entries(self) -> Iterator[CTRow]: ...
    def ct_delete(self, rows: list[CTRow]) -> int: ...
    def frag_forget(self, ep_id: int, addrs: Collection[IPAddress]) -> int:
        """Delete the fragment entries of ``ep_id`` and those naming any of ``addrs``."""
        ...
    def metrics(self) -> dict[tuple[int, int], Counters]: ...
    def poll_events(self, timeout_ms: int) -> list[dict[str, object]]: ...
    def now_ns(self) -> int: ...


class MemoryDatapath:
    """The in-memory twin: maps are dicts, pods are records."""

    def __init__(self) -> None:
        self.endpoints: dict[int, EndpointRow] = {}
        self.policy: dict[PolicyKey, PolicyValue] = {}
        self.ipcache: dict[IPNetwork, int] = {}
        self.pods: dict[str, PodInfo] = {}
        self.foreign: set[str] = set()  # netns names made by someone else (tests)
        self.adopted: dict[str, str] = {}  # netns name -> runtime path, until ensure_pod
        self.route_mtu: int | None = None  # the host's default route MTU (None: no route)
        self.attached: set[int] = set()
        self.ct: list[CTRow] = []
        #: fragment entries: (endpoint id, source, destination) of first fragments that passed
        self.frags: list[tuple[int, IPAddress, IPAddress]] = []
        self.events: list[dict[str, object]] = []
        self.clock_ns = 0
        self.generation = 0  # bumps of the verdict cache generation
        self._next_ifindex = 100
        self.host = [ipaddress.ip_address("192.0.2.1")]
        self.node_routes: dict[IPNetwork, IPAddress] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def ensure_pod(
        self, name: str, ipv4: ipaddress.IPv4Address, ipv6: ipaddress.IPv6Address | None,
        ifname: str = "eth0", mtu: int | None = None,
    ) -> PodInfo:
        old = self.pods.get(name)
        ifindex = old.ifindex if old else self._next_ifindex
        if old is None:
            self._next_ifindex += 1
        pod = PodInfo(name, f"fl{ifindex:08x}", ifindex, ipv4, ipv6, ifname, f"02:00:00:00:{ifindex >> 8 & 0xff:02x}:{ifindex & 0xff:02x}")
        self.pods[name] = pod
        self.adopted.pop(name, None)
        return pod

    def adopt_netns(self, name: str, path: str, ifname: str) -> None:
        self.check_pod_name(name)
        if path in self.adopted.values():
            raise InputError(f"pod {name}: network namespace {path} already holds a pod")
        self.adopted[name] = path

    def host_route_mtu(self) -> int | None:
        return self.route_mtu

    def check_pod_name(self, name: str) -> None:
        if name in self.pods or name in self.foreign:
            raise InputError(f"pod {name}: network namespace {name!r} already exists")

    def remove_pod(self, name: str) -> None:
        self.pods.pop(name, None)
        self.adopted.pop(name, None)

    def list_pods(self) -> list[PodInfo]:
        return list(self.pods.values())

    def host_addresses(self) -> list[IPAddress]:
        return list(self.host)

    def set_node_routes(self, routes: dict[IPNetwork, IPAddress]) -> None:
        self.node_routes = dict(routes)

    def attach(self, ifindex: int) -> list[str]:
        if ifindex in self.attached:
            return []
        self.attached.add(ifindex)
        return ["from_pod", "to_pod"]

    def detach(self, ifindex: int) -> None:
        self.attached.discard(ifindex)

    def delete_policy_entries(self, keys: Collection[PolicyKey]) -> int:
        return sum(1 for k in keys if self.policy.pop(k, None) is not None)

    def bump_generation(self) -> None:
        self.generation += 1

    def policy_counters(self, ep_id: int) -> dict[PolicyKey, tuple[PolicyValue, Counters]]:
        return {k: (v, Counters(0, 0)) for k, v in self.policy.items() if k.ep_id == ep_id}

    def ct_entries(self) -> Iterator[CTRow]:
        return iter(list(self.ct))

    def ct_delete(self, rows: list[CTRow]) -> int:
        before = len(self.ct)
        gone = set(rows)
        self.ct = [r for r in self.ct if r not in gone]
        return before - len(self.ct)

    def frag_forget(self, ep_id: int, addrs: Collection[IPAddress]) -> int:
        before = len(self.frags)
        self.frags = [f for f in self.frags if f[0] != ep_id and f[1] not in addrs and f[2] not in addrs]
        return before - len(self.frags)

    def metrics(self) -> dict[tuple[int, int], Counters]:
        return {}

    def poll_events(self, timeout_ms: int) -> list[dict[str, object]]:
        out, self.events = self.events, []
        return out

    def now_ns(self) -> int:
        return self.clock_ns
