"""Pod links: network namespaces joined to the host by veth pairs, routed at layer 3.

Theory of operation
-------------------
A pod is a named network namespace (``/var/run/netns/NAME``, so ``ip netns exec NAME``
works) joined to the host by a veth pair. The agent names it with
`flagella.datapath.port.pod_netns_name`, injectively (``<namespace>_<name>``; neither
may contain ``_``). A create claims only names that are free (`PodNetwork.check_free`):
an existing netns or host veth of the name was not made for this pod (another pod's,
another agent's, an operator's) and is refused, never taken over. The host end is named
from the namespace name (`host_ifname_for`: ``fl`` + 8 hex digits of its SHA-256) and
records that name in its ifalias, which is how `PodNetwork.list_pods` finds pods again
after an agent restart (the pod end is found as the host end's peer, whatever its name).
The pod end is ``eth0`` unless the caller names it.

A container runtime creates the namespace itself and hands the agent its path (CNI
``CNI_NETNS``, ``CNI_IFNAME``). `PodNetwork.adopt_netns` then gives that namespace the
agent's name with a bind mount, so everything below works on it unchanged, under the same
rules: the name must be free, the namespace must not already be named for another pod or
be the agent's own, and the interface name must not exist in it (a pod's interface is
created, never taken over). Removing the pod unmounts the name only; the namespace lives
on until the runtime drops its own reference.

Routing follows Cilium's veth mode: the pod owns a /32 (and /128) and routes everything
to a link-local gateway that nobody owns (169.254.1.1 ``onlink``, fe80::1). Permanent
neighbour entries on both ends map the gateway to the host veth's MAC and the pod address
to eth0's MAC, so no ARP or NDP crosses the link. The host routes each pod address to its
veth (scope link, main table) and forwards between veths; fe80::1 lives on every host veth
only so the pod's IPv6 default route has a router that answers. With an overlay, the pod's
default routes carry ``mtu = device mtu - tunnel_mtu_overhead`` while the devices stay at
full size, so TCP picks a fitting MSS without shrinking the link.

`PodNetwork.ensure_pod` is a reconciler, not a constructor: it reads what exists and
changes only what differs. On a healthy pod it writes nothing (no link flap; open
connections survive); on a damaged one it repairs in place (MTU, state, addresses, routes,
neighbours, sysctls) and logs ``pod_link_repaired`` with what it fixed. It recreates the
veth only when the existing ends are not each other's peers. Flagella's routes carry
`ROUTE_PROTOCOL`, so stale ones can be told apart from the kernel's and an operator's. A
failure leaves partial state that the next call repairs; there is no rollback.

Host routes and neighbours belong to the host veth, so deleting the veth (`remove_pod`)
removes them with it. `prepare_host` puts an ``unreachable`` route under each node pod
CIDR, so a pod address without a pod is never sent out of the host's default route.

Pod addresses are handed out by `flagella.endpoint.addressing.PodAddressAllocator`
(re-exported here), the one IPAM implementation.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import structlog

from flagella.datapath import _netlink
from flagella.datapath._netlink import (
    RTN_UNREACHABLE,
    SCOPE_LINK,
    Netlink,
    Route,
    describe_route,
)
from flagella.endpoint.addressing import PodAddressAllocator, PodCIDRExhausted
from flagella.errors import DatapathError, InputError

__all__ = [
    "GATEWAY_IPV4",
    "GATEWAY_IPV6",
    "POD_IFNAME",
    "ROUTE_PROTOCOL",
    "LinkSettings",
    "PodAddressAllocator",
    "PodCIDRExhausted",
    "PodLink",
    "PodNetwork",
    "PodNameTaken",
    "check_ifname",
    "host_ifname_for",
    "prepare_host",
]

log = structlog.get_logger("flagella.datapath.links")

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

GATEWAY_IPV4 = IPv4Address("169.254.1.1")
GATEWAY_IPV6 = IPv6Address("fe80::1")
POD_IFNAME = "eth0"
HOST_IFNAME_PREFIX = "fl"
#: rtm_protocol of every route Flagella adds (unassigned in iproute2's rt_protos):
#: ``ip route show proto 205`` lists them.
ROUTE_PROTOCOL = 205

_NETNS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Interface names the kernel takes (IFNAMSIZ 16 with the NUL; no '/', ':' or spaces).
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
_MIN_MTU_IPV4 = 576
_MIN_MTU_IPV6 = 1280


@dataclass(frozen=True)
class LinkSettings:
    """How this node plumbs pods; validated on construction.

    Attributes:
        ipv4_cidr: the node's IPv4 pod CIDR, a slice of the cluster's 10.244.0.0/16.
            Every pod IPv4 address must lie in it.
        ipv6_cidr: the node's IPv6 pod CIDR (a slice of fd00:10:244::/48), or None on an
            IPv4-only node.
        mtu: MTU of both veth ends.
        tunnel_mtu_overhead: bytes an overlay adds to each packet (50 for VXLAN, 0 for
            native routing). When set, pod default routes carry ``mtu - overhead``.
    """

    ipv4_cidr: IPv4Network = IPv4Network("10.244.0.0/24")
    ipv6_cidr: IPv6Network | None = IPv6Network("fd00:10:244::/112")
    mtu: int = 1500
    tunnel_mtu_overhead: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.ipv4_cidr, IPv4Network):
            raise InputError(f"ipv4_cidr: must be an IPv4Network, got {self.ipv4_cidr!r}")
        if self.ipv6_cidr is not None and not isinstance(self.ipv6_cidr, IPv6Network):
            raise InputError(f"ipv6_cidr: must be an IPv6Network or None, got {self.ipv6_cidr!r}")
        floor = _MIN_MTU_IPV6 if self.ipv6_cidr is not None else _MIN_MTU_IPV4
        if not floor <= self.mtu <= 65535:
            raise InputError(f"mtu: must be {floor}-65535, got {self.mtu}")
        if not 0 <= self.tunnel_mtu_overhead <= self.mtu - floor:
            raise InputError(
                f"tunnel_mtu_overhead: must be 0-{self.mtu - floor} with mtu {self.mtu}, "
                f"got {self.tunnel_mtu_overhead}"
            )

    @property
    def route_mtu(self) -> int | None:
        """MTU put on pod default routes, or None when there is no tunnel overhead."""
        return self.mtu - self.tunnel_mtu_overhead if self.tunnel_mtu_overhead else None


@dataclass(frozen=True)
class PodLink:
    """One plumbed pod, as `PodNetwork.ensure_pod` left it or `list_pods` found it."""

    netns: str
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_mac: str
    ipv4: IPv4Address
    ipv6: IPv6Address | None
    pod_ifname: str = POD_IFNAME


def host_ifname_for(netns: str) -> str:
    """The host-side veth name of the pod in ``netns``: stable, unique enough, 10 chars."""
    return HOST_IFNAME_PREFIX + hashlib.sha256(netns.encode()).hexdigest()[:8]


class PodNameTaken(InputError):
    """A pod's netns or host veth name is already in use by something else."""


def check_ifname(ifname: str) -> None:
    """Refuse a name the kernel would refuse or misread as a path."""
    if not _IFNAME.fullmatch(ifname or ""):
        raise InputError(
            f"interface name {ifname!r}: must be 1-15 of [A-Za-z0-9_.-], not starting with '.' or '-'"
        )


def _check_netns_name(name: str) -> None:
    if not _NETNS_NAME.fullmatch(name):
        raise InputError(
            f"netns name {name!r}: must be 1-64 of [A-Za-z0-9_.-], starting with a letter or digit"
        )


def prepare_host(settings: LinkSettings) -> None:
    """Ready the host for routing pods (idempotent).

    Turns on forwarding, and installs an ``unreachable`` route for each node pod CIDR:
    pod /32 and /128 routes are more specific, and an address with no pod behind it (a
    removed pod, a route deleted by hand) is refused locally instead of being sent out of
    the default route.
    """
    changed = [
        key
        for key, enabled in (
            ("net/ipv4/ip_forward", True),
            ("net/ipv6/conf/all/forwarding", settings.ipv6_cidr is not None),
        )
        if enabled and _netlink.set_sysctl(key, "1")
    ]
    cidrs = [c for c in (settings.ipv4_cidr, settings.ipv6_cidr) if c is not None]
    with _netlink.host() as host:
        present = {
            r.dst
            for r in host.routes()
            if r.kind == RTN_UNREACHABLE and r.protocol == ROUTE_PROTOCOL
        }
        for cidr in cidrs:
            if cidr not in present:
                route = Route(cidr, None, protocol=ROUTE_PROTOCOL, kind=RTN_UNREACHABLE)
                host.replace_route(route)
                changed.append(describe_route(route))
    if changed:
        log.info("host_prepared", changed=changed)


def ensure_node_routes(routes: dict[IPNetwork, IPAddress]) -> list[str]:
    """Routes to the other nodes' pod CIDRs via their node IPs (direct routing).

    Flagella's gateway routes in the main table become exactly ``routes`` (pod routes
    have no gateway, so they are never touched). A route the kernel refuses (a gateway
    not on any local subnet) is skipped and named in the `DatapathError` raised after
    the others were applied. Returns what changed, ``ip route`` style.
    """
    changed: list[str] = []
    refused: list[str] = []
    with _netlink.host() as host:
        present = {
            r.dst: r
            for r in host.routes()
            if r.protocol == ROUTE_PROTOCOL and r.gateway is not None and r.kind != RTN_UNREACHABLE
        }
        for dst, gateway in sorted(routes.items(), key=lambda kv: str(kv[0])):
            if dst in present and present[dst].gateway == gateway:
                continue
            route = Route(dst, None, gateway=gateway, protocol=ROUTE_PROTOCOL)
            try:
                host.replace_route(route)
            except DatapathError as exc:
                refused.append(f"{describe_route(route)}: {exc}")
                continue
            changed.append(describe_route(route))
        for dst, route in present.items():
            if dst not in routes:
                host.delete_route(route)
                changed.append(f"deleted {describe_route(route)}")
    if changed:
        log.info("node_routes_changed", changed=changed)
    if refused:
        raise DatapathError("node routes refused: " + "; ".join(refused))
    return changed


class PodNetwork:
    """Creates, repairs, finds and removes pod links on this node.

    Methods open their own netlink handles, so different pods may be handled from
    different threads at once; calls for one pod must be serialised by the caller.
    """

    def __init__(self, settings: LinkSettings) -> None:
        self.settings = settings

    # -- ensure ------------------------------------------------------------------------------

    def ensure_pod(
        self,
        name: str,
        ipv4: IPv4Address,
        ipv6: IPv6Address | None = None,
        pod_ifname: str = POD_IFNAME,
        mtu: int | None = None,
    ) -> PodLink:
        """Make pod ``name`` exist with these addresses, creating or repairing it in place.

        ``pod_ifname`` names the pod end (CNI_IFNAME); ``mtu`` overrides the settings'
        device MTU for this pod (the route MTU follows it, minus any tunnel overhead)."""
        self._check_request(name, ipv4, ipv6)
        check_ifname(pod_ifname)
        mtu = self.settings.mtu if mtu is None else mtu
        floor = _MIN_MTU_IPV6 if ipv6 is not None else _MIN_MTU_IPV4
        if not floor + self.settings.tunnel_mtu_overhead <= mtu <= 65535:
            raise InputError(f"pod {name}: mtu {mtu} must be {floor + self.settings.tunnel_mtu_overhead}-65535")
        host_ifname = host_ifname_for(name)
        repairs: list[str] = []
        if not _netlink.netns_exists(name):
            _netlink.create_netns(name)
        with _netlink.host() as host, _netlink.netns(name) as pod:
            host_link, pod_link, created = self._ensure_veth(
                host, pod, name, host_ifname, pod_ifname, mtu, repairs
            )
            self._ensure_sysctls(name, host_ifname, pod_ifname, repairs)
            lo = pod.link("lo")
            if lo is not None and not lo.up:
                pod.set_link(lo, state="up")
                repairs.append("set pod lo up")
            if ipv6 is not None:
                self._ensure_host_gateway(host, host_link.index, repairs)
            self._ensure_pod_addresses(pod, pod_link.index, ipv4, ipv6, repairs)
            gateways: list[IPAddress] = [GATEWAY_IPV4] + ([GATEWAY_IPV6] if ipv6 else [])
            pod_ips: list[IPAddress] = [ipv4] + ([ipv6] if ipv6 else [])
            self._ensure_neighbours(pod, pod_link.index, gateways, host_link.mac, repairs)
            self._ensure_neighbours(host, host_link.index, pod_ips, pod_link.mac, repairs)
            self._ensure_routes(
                pod,
                self._pod_routes(pod_link.index, ipv6 is not None, mtu),
                pod.routes(),
                owned=lambda r: r.protocol == ROUTE_PROTOCOL or r.dst.prefixlen == 0,
                repairs=repairs,
            )
            self._ensure_routes(
                host,
                self._host_routes(host_link.index, pod_ips),
                host.routes(oif=host_link.index),
                owned=lambda r: r.protocol == ROUTE_PROTOCOL,
                repairs=repairs,
            )
        result = PodLink(
            name, host_ifname, host_link.index, host_link.mac, pod_link.mac, ipv4, ipv6, pod_ifname
        )
        if created:
            log.info(
                "pod_link_created",
                netns=name,
                host_ifname=host_ifname,
                ipv4=str(ipv4),
                ipv6=str(ipv6) if ipv6 else None,
            )
        elif repairs:
            log.warning("pod_link_repaired", netns=name, host_ifname=host_ifname, repairs=repairs)
        return result

    def _check_request(self, name: str, ipv4: IPv4Address, ipv6: IPv6Address | None) -> None:
        _check_netns_name(name)
        if not isinstance(ipv4, IPv4Address) or ipv4 not in self.settings.ipv4_cidr:
            raise InputError(f"pod {name}: ipv4 {ipv4} is not in {self.settings.ipv4_cidr}")
        if ipv6 is not None and (
            not isinstance(ipv6, IPv6Address)
            or self.settings.ipv6_cidr is None
            or ipv6 not in self.settings.ipv6_cidr
        ):
            raise InputError(f"pod {name}: ipv6 {ipv6} is not in {self.settings.ipv6_cidr}")

    def _ensure_veth(
        self,
        host: Netlink,
        pod: Netlink,
        name: str,
        host_ifname: str,
        pod_ifname: str,
        mtu: int,
        repairs: list[str],
    ) -> tuple[_netlink.Link, _netlink.Link, bool]:
        """The paired veth ends, up with the right MTU, and whether they were just created."""
        host_link = host.link(host_ifname)
        if host_link is not None and host_link.alias not in (None, name):
            raise DatapathError(
                f"pod {name}: host interface {host_ifname} belongs to netns {host_link.alias}"
            )
        pod_link = pod.link(pod_ifname)
        paired = (
            host_link is not None
            and pod_link is not None
            and host_link.kind == pod_link.kind == "veth"
            and host_link.peer_index == pod_link.index
            and pod_link.peer_index == host_link.index
        )
        if not paired:
            if host_link is not None:
                host.delete_link(host_link)
                repairs.append(f"deleted unpaired host link {host_ifname}")
            # Re-read: deleting a veth end takes its peer with it.
            if pod_link is not None and pod.link(pod_ifname) is not None:
                pod.delete_link(pod_link)
                repairs.append(f"deleted unpaired pod link {pod_ifname}")
            host.add_veth(host_ifname, pod_ifname, name, mtu)
            host_link, pod_link = host.link(host_ifname), pod.link(pod_ifname)
        if host_link is None or pod_link is None:
            raise DatapathError(f"pod {name}: veth {host_ifname} vanished after creation")

        host_changes: dict[str, object] = {}
        if host_link.mtu != mtu:
            host_changes["mtu"] = mtu
        if host_link.alias != name:
            host_changes["ifalias"] = name
        if not host_link.up:
            host_changes["state"] = "up"
        if host_changes:
            host.set_link(host_link, **host_changes)
            repairs.append(f"set {sorted(host_changes)} on {host_ifname}")
        pod_changes: dict[str, object] = {}
        if pod_link.mtu != mtu:
            pod_changes["mtu"] = mtu
        if not pod_link.up:
            pod_changes["state"] = "up"
        if pod_changes:
            pod.set_link(pod_link, **pod_changes)
            repairs.append(f"set {sorted(pod_changes)} on pod {pod_ifname}")
        return host_link, pod_link, not paired

    def _ensure_sysctls(self, name: str, host_ifname: str, pod_ifname: str, repairs: list[str]) -> None:
        host_values = [
            (f"net/ipv4/conf/{host_ifname}/rp_filter", "0"),
            (f"net/ipv4/conf/{host_ifname}/forwarding", "1"),
        ]
        if self.settings.ipv6_cidr is not None:
            host_values += [
                (f"net/ipv6/conf/{host_ifname}/accept_ra", "0"),
                (f"net/ipv6/conf/{host_ifname}/forwarding", "1"),
            ]
            pod_keys = [f"net/ipv6/conf/{dev}/accept_dad" for dev in ("all", "default", pod_ifname)]

            def set_pod_sysctls() -> list[str]:
                return [key for key in pod_keys if _netlink.set_sysctl(key, "0")]

            repairs += [f"pod sysctl {k}=0" for k in _netlink.run_in_netns(name, set_pod_sysctls)]
        repairs += [f"sysctl {k}={v}" for k, v in host_values if _netlink.set_sysctl(k, v)]

    @staticmethod
    def _ensure_host_gateway(host: Netlink, index: int, repairs: list[str]) -> None:
        if not any(a.ip == GATEWAY_IPV6 for a in host.addresses(index)):
            host.add_address(index, GATEWAY_IPV6, 64, scope=SCOPE_LINK)
            repairs.append(f"added {GATEWAY_IPV6}/64 on host veth")

    @staticmethod
    def _ensure_pod_addresses(
        pod: Netlink, index: int, ipv4: IPv4Address, ipv6: IPv6Address | None, repairs: list[str]
    ) -> None:
        wanted: set[tuple[IPAddress, int]] = {(ipv4, 32)} | ({(ipv6, 128)} if ipv6 else set())
        present = {(a.ip, a.prefixlen): a for a in pod.addresses(index)}
        for key, address in present.items():
            if key not in wanted and not address.ip.is_link_local:
                pod.delete_address(address)
                repairs.append(f"removed pod address {address.ip}/{address.prefixlen}")
        for ip, prefixlen in sorted(wanted - present.keys(), key=str):
            pod.add_address(index, ip, prefixlen)
            repairs.append(f"added pod address {ip}/{prefixlen}")

    @staticmethod
    def _ensure_neighbours(
        nl: Netlink, index: int, ips: list[IPAddress], mac: str, repairs: list[str]
    ) -> None:
        present = {n.ip: n for n in nl.neighbours(index)}
        for neighbour in present.values():
            if neighbour.permanent and neighbour.ip not in ips:
                nl.delete_neighbour(neighbour)
                repairs.append(f"removed neighbour {neighbour.ip} in {nl.where}")
        for ip in ips:
            current = present.get(ip)
            if current is None or not current.permanent or current.mac != mac:
                nl.set_permanent_neighbour(index, ip, mac)
                repairs.append(f"set neighbour {ip} lladdr {mac} in {nl.where}")

    def _pod_routes(self, eth0: int, ipv6: bool, device_mtu: int) -> list[Route]:
        overhead = self.settings.tunnel_mtu_overhead
        mtu = device_mtu - overhead if overhead else None
        routes = [
            Route(
                IPv4Network("0.0.0.0/0"), eth0, GATEWAY_IPV4, ROUTE_PROTOCOL, onlink=True, mtu=mtu
            )
        ]
        if ipv6:
            routes.append(Route(IPv6Network("::/0"), eth0, GATEWAY_IPV6, ROUTE_PROTOCOL, mtu=mtu))
        return routes

    @staticmethod
    def _host_routes(veth: int, pod_ips: list[IPAddress]) -> list[Route]:
        return [
            Route(
                IPv4Network(ip) if ip.version == 4 else IPv6Network(ip),
                veth,
                protocol=ROUTE_PROTOCOL,
                scope=SCOPE_LINK if ip.version == 4 else _netlink.SCOPE_UNIVERSE,
            )
            for ip in pod_ips
        ]

    @staticmethod
    def _ensure_routes(
        nl: Netlink,
        wanted: list[Route],
        present: list[Route],
        owned: Callable[[Route], bool],
        repairs: list[str],
    ) -> None:
        wanted_keys = {r.dst for r in wanted}
        for route in present:
            # A wrong route to a wanted destination is overwritten by "replace" below;
            # deleting it first would open a window without a route.
            if owned(route) and route not in wanted and route.dst not in wanted_keys:
                nl.delete_route(route)
                repairs.append(f"removed route {describe_route(route)} in {nl.where}")
        for route in wanted:
            if route not in present:
                nl.replace_route(route)
                repairs.append(f"set route {describe_route(route)} in {nl.where}")

    def check_free(self, name: str) -> None:
        """Raise `PodNameTaken` when netns ``name`` or its host veth already exists: a new
        pod never takes over what it did not create."""
        _check_netns_name(name)
        host_ifname = host_ifname_for(name)
        if _netlink.netns_exists(name):
            raise PodNameTaken(
                f"pod {name}: network namespace {name!r} already exists and was not made for "
                "this endpoint; refusing to take it over"
            )
        with _netlink.host() as host:
            link = host.link(host_ifname)
        if link is not None:
            raise PodNameTaken(
                f"pod {name}: host interface {host_ifname} already exists (alias "
                f"{link.alias!r}) and was not made for this endpoint; refusing to take it over"
            )

    def adopt_netns(self, name: str, path: str, pod_ifname: str = POD_IFNAME) -> None:
        """Give the runtime's namespace at ``path`` the pod name ``name`` (see the module
        docstring), refusing what would take over something not made for this pod."""
        self.check_free(name)
        check_ifname(pod_ifname)
        own = _netlink.netns_identity("/proc/self/ns/net")
        real = Path(os.path.realpath(path))
        # Checks and the bind mount all go through one held descriptor: swapping the file
        # at ``path`` after the checks cannot make us adopt an unchecked namespace.
        with _netlink.held_netns(path) as (held, ident):
            if ident == own:
                raise PodNameTaken(f"pod {name}: {path} is the agent's own network namespace")
            for other, other_ident in _netlink.named_netns_identities().items():
                if other_ident != ident or _netlink.netns_path(other) == real:
                    continue
                with _netlink.host() as host:
                    link = host.link(host_ifname_for(other))
                if link is not None and link.alias == other:
                    raise PodNameTaken(f"pod {name}: network namespace {path} already holds pod {other}")
            with _netlink.netns(name, held) as inside:
                taken = inside.link(pod_ifname) is not None
            if taken:
                raise PodNameTaken(
                    f"pod {name}: interface {pod_ifname} already exists in {path}; refusing to take it over"
                )
            _netlink.adopt_netns(name, held)
        log.info("pod_netns_adopted", netns=name, path=path, ifname=pod_ifname)

    # -- remove, list ------------------------------------------------------------------------

    def remove_pod(self, name: str) -> bool:
        """Remove pod ``name``'s veth (its routes and neighbours go with it) and netns.

        Returns False, doing nothing, when neither exists any more.
        """
        _check_netns_name(name)
        host_ifname = host_ifname_for(name)
        removed = False
        with _netlink.host() as host:
            link = host.link(host_ifname)
            if link is not None:
                if link.alias not in (None, name):
                    raise DatapathError(
                        f"pod {name}: host interface {host_ifname} belongs to netns {link.alias}"
                    )
                host.delete_link(link)
                removed = True
        removed = _netlink.remove_netns(name) or removed
        if removed:
            log.info("pod_link_removed", netns=name, host_ifname=host_ifname)
        return removed

    def list_pods(self) -> list[PodLink]:
        """The pods plumbed on this node, found from host veths named and aliased by us.

        A pod is listed when its host veth, netns and peer ``eth0`` with an IPv4 address
        all exist; others are logged as ``pod_link_incomplete`` (`remove_pod` cleans them).
        """
        with _netlink.host() as host:
            ours = [
                link
                for link in host.links()
                if link.kind == "veth"
                and link.alias is not None
                and _NETNS_NAME.fullmatch(link.alias)
                and host_ifname_for(link.alias) == link.ifname
            ]
        pods = []
        for link in sorted(ours, key=lambda link: link.alias or ""):
            pod = self._read_pod(link)
            if pod is not None:
                pods.append(pod)
        return pods

    @staticmethod
    def _read_pod(host_link: _netlink.Link) -> PodLink | None:
        name = host_link.alias or ""
        if not _netlink.netns_exists(name):
            log.warning("pod_link_incomplete", netns=name, reason="netns missing")
            return None
        with _netlink.netns(name) as pod:
            eth0 = next((link for link in pod.links() if link.index == host_link.peer_index), None)
            if eth0 is None or eth0.peer_index != host_link.index:
                log.warning("pod_link_incomplete", netns=name, reason="eth0 is not the peer")
                return None
            addresses = [a.ip for a in pod.addresses(eth0.index) if not a.ip.is_link_local]
        ipv4 = next((ip for ip in addresses if isinstance(ip, IPv4Address)), None)
        ipv6 = next((ip for ip in addresses if isinstance(ip, IPv6Address)), None)
        if ipv4 is None:
            log.warning("pod_link_incomplete", netns=name, reason="no IPv4 address")
            return None
        return PodLink(
            name, host_link.ifname, host_link.index, host_link.mac, eth0.mac, ipv4, ipv6, eth0.ifname
        )

    @staticmethod
    def host_route_mtu() -> int | None:
        """MTU of the host's IPv4 default route (its own ``mtu`` metric, else its device's),
        or None without a default route."""
        with _netlink.host() as host:
            default = next(
                (r for r in host.routes() if r.dst.prefixlen == 0 and r.dst.version == 4 and r.oif),
                None,
            )
            if default is None:
                return None
            if default.mtu:
                return default.mtu
            device = next((link for link in host.links() if link.index == default.oif), None)
        return device.mtu if device is not None else None

    @staticmethod
    def host_addresses() -> list[IPAddress]:
        """Every address configured on the host (any interface, any scope), deduplicated."""
        with _netlink.host() as host:
            found = {a.ip for a in host.addresses()}
        return sorted(found, key=lambda ip: (ip.version, int(ip)))
