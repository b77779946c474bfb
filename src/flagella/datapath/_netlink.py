"""The kernel boundary of pod links: netlink, network namespaces and sysctls.

Everything pyroute2 (and libc) lives here; `links` above it sees only the typed records
`Link`, `Address`, `Neighbour` and `Route`, and every failure arrives as `DatapathError`.

Network namespaces are entered from a short-lived *thread*, never the calling thread:
``setns(2)`` and ``unshare(CLONE_NEWNET)`` change only the thread that calls them, so a
helper thread can create a namespace, open a netlink socket in it (the socket stays bound
to that namespace after the thread ends) or write its ``/proc/sys/net`` files, while the
rest of the process stays in the host namespace. This is cheaper than pyroute2's
fork-per-namespace and keeps namespaces compatible with ``ip netns``: they are bind mounts
under ``/var/run/netns``, which is made a shared mount the way iproute2 does it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_GETNEIGH, RTM_GETROUTE
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from flagella.errors import DatapathError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

NETNS_DIR = Path("/var/run/netns")
SYSCTL_DIR = Path("/proc/sys")

MAIN_TABLE = 254
SCOPE_UNIVERSE = 0
SCOPE_LINK = 253
NUD_PERMANENT = 0x80
IFF_UP = 0x1
IFA_F_NODAD = 0x02
RTNH_F_ONLINK = 0x4
RTN_UNICAST = 1
RTN_UNREACHABLE = 7

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2

_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)
_netns_dir_lock = threading.Lock()  # two first-time binds of /var/run/netns would stack


@contextmanager
def kernel_errors(action: str) -> Iterator[None]:
    """Translate netlink and OS errors raised while doing ``action`` into `DatapathError`."""
    try:
        yield
    except NetlinkError as exc:
        code = exc.code or errno.EIO
        raise DatapathError(f"{action}: {os.strerror(code)} (errno {code})") from exc
    except NetlinkDumpInterrupted as exc:
        raise DatapathError(f"{action}: netlink dump interrupted, retry") from exc
    except OSError as exc:
        raise DatapathError(f"{action}: {exc.strerror or exc}") from exc


# -- network namespaces ----------------------------------------------------------------------


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    """A namespace exists when its file under /var/run/netns is a mount (of nsfs)."""
    return os.path.ismount(netns_path(name))


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _in_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on a fresh OS thread and return its result (or raise its exception)."""
    result: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name="flagella-netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def run_in_netns(name: str, fn: Callable[[], _T], path: str | Path | None = None) -> _T:
    """Run ``fn`` on a helper thread that has joined namespace ``name`` (or the one
    at ``path``, any nsfs file: a runtime's ``CNI_NETNS``)."""

    def enter_and_run() -> _T:
        fd = os.open(path or netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, _CLONE_NEWNET), f"setns {name}")
        finally:
            os.close(fd)
        return fn()

    with kernel_errors(f"enter network namespace {name}"):
        return _in_thread(enter_and_run)


def _share_netns_dir() -> None:
    """Make /var/run/netns a shared mount (iproute2 ``netns_add`` does the same)."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    target = bytes(NETNS_DIR)
    with _netns_dir_lock:
        if _libc.mount(b"none", target, None, _MS_SHARED | _MS_REC, None) == 0:
            return
        if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
            _check(-1, "make /var/run/netns shared")
        _check(_libc.mount(target, target, b"none", _MS_BIND | _MS_REC, None), "bind netns dir")
        _check(_libc.mount(b"none", target, None, _MS_SHARED | _MS_REC, None), "share netns dir")


def create_netns(name: str) -> None:
    """Create namespace ``name``; a leftover plain file (a crashed create) is replaced."""
    path = netns_path(name)

    def unshare_and_bind() -> None:
        _check(_libc.unshare(_CLONE_NEWNET), "unshare")
        _check(
            _libc.mount(b"/proc/thread-self/ns/net", bytes(path), b"none", _MS_BIND, None),
            f"bind-mount {path}",
        )

    with kernel_errors(f"create network namespace {name}"):
        _share_netns_dir()
        if path.exists() and not os.path.ismount(path):
            path.unlink()
        path.touch(mode=0o444, exist_ok=False)
        try:
            _in_thread(unshare_and_bind)
        except BaseException:
            path.unlink(missing_ok=True)
            raise


_NS_GET_NSTYPE = 0xB703  # ioctl(2) on an nsfs file: its CLONE_NEW* type


@contextmanager
def held_netns(path: str | Path) -> Iterator[tuple[str, tuple[int, int]]]:
    """Open the network namespace file ``path`` once and hold it: yields a path to the held
    descriptor (``/proc/self/fd/N``) and the namespace's (device, inode). Everything done
    through that path concerns the namespace that was checked, even if ``path`` is swapped
    meanwhile. `DatapathError` when ``path`` is not a network namespace."""
    import fcntl

    with kernel_errors(f"open network namespace {path}"):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
        except OSError:
            kind = -1
        if kind != _CLONE_NEWNET:
            raise DatapathError(f"{path} is not a network namespace")
        st = os.fstat(fd)
        yield f"/proc/self/fd/{fd}", (st.st_dev, st.st_ino)
    finally:
        os.close(fd)


def netns_identity(path: str | Path) -> tuple[int, int]:
    """(device, inode) of the network namespace file ``path``."""
    with held_netns(path) as (_held, ident):
        return ident


def named_netns_identities() -> dict[str, tuple[int, int]]:
    """Every namespace named under /var/run/netns, by name (unreadable entries skipped)."""
    out: dict[str, tuple[int, int]] = {}
    if not NETNS_DIR.is_dir():
        return out
    for entry in NETNS_DIR.iterdir():
        if os.path.ismount(entry):
            try:
                st = os.stat(entry)
            except OSError:
                continue
            out[entry.name] = (st.st_dev, st.st_ino)
    return out


def adopt_netns(name: str, path: str) -> None:
    """Name the existing namespace ``path`` (a container runtime's) ``name``: a bind mount
    at /var/run/netns/NAME. `remove_netns` undoes it; the runtime's own reference keeps
    the namespace alive until the runtime removes it."""
    target = netns_path(name)

    with kernel_errors(f"adopt network namespace {path} as {name}"):
        _share_netns_dir()
        if target.exists() and not os.path.ismount(target):
            target.unlink()
        target.touch(mode=0o444, exist_ok=False)
        try:
            _check(_libc.mount(os.fsencode(path), bytes(target), b"none", _MS_BIND, None), f"bind-mount {path}")
        except BaseException:
            target.unlink(missing_ok=True)
            raise


def remove_netns(name: str) -> bool:
    """Unmount and unlink namespace ``name``; False when it was already gone."""
    path = netns_path(name)
    with kernel_errors(f"remove network namespace {name}"):
        if not path.exists():
            return False
        if _libc.umount2(bytes(path), _MNT_DETACH) != 0 and ctypes.get_errno() not in (
            errno.EINVAL,  # not a mount: a leftover file
            errno.ENOENT,
        ):
            _check(-1, f"umount {path}")
        path.unlink(missing_ok=True)
        return True


# -- sysctls ---------------------------------------------------------------------------------


def set_sysctl(key: str, value: str) -> bool:
    """Write ``value`` to /proc/sys/``key`` (slash-separated) unless it already holds it.

    Returns True when the value changed. Keys under ``net/`` act on the network namespace
    of the calling thread, so inside `run_in_netns` they set the pod's sysctls.
    """
    path = SYSCTL_DIR / key
    with kernel_errors(f"sysctl {key}={value}"):
        if path.read_text().strip() == value:
            return False
        path.write_text(value)
        return True


# -- netlink ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    index: int
    ifname: str
    kind: str | None
    mtu: int
    up: bool
    mac: str
    peer_index: int | None  # IFLA_LINK: a veth's peer ifindex, in the peer's namespace
    alias: str | None


@dataclass(frozen=True)
class Address:
    ip: IPAddress
    prefixlen: int
    scope: int
    index: int


@dataclass(frozen=True)
class Neighbour:
    ip: IPAddress
    mac: str | None
    permanent: bool
    index: int


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    oif: int | None
    gateway: IPAddress | None = None
    protocol: int = 0
    scope: int = SCOPE_UNIVERSE
    onlink: bool = False
    mtu: int | None = None
    table: int = MAIN_TABLE
    kind: int = RTN_UNICAST  # rtm_type


def _family(value: IPAddress | IPNetwork) -> int:
    return socket.AF_INET if value.version == 4 else socket.AF_INET6


def _link(msg: Any) -> Link:
    return Link(
        index=msg["index"],
        ifname=msg.get("IFLA_IFNAME"),
        kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
        mtu=msg.get("IFLA_MTU"),
        up=bool(msg["flags"] & IFF_UP),
        mac=msg.get("IFLA_ADDRESS"),
        peer_index=msg.get("IFLA_LINK"),
        alias=msg.get("IFLA_IFALIAS"),
    )


def _route(msg: Any) -> Route:
    family_any = "0.0.0.0" if msg["family"] == socket.AF_INET else "::"
    dst = ip_network(f"{msg.get('RTA_DST') or family_any}/{msg['dst_len']}")
    gateway = msg.get("RTA_GATEWAY")
    metrics = msg.get("RTA_METRICS")
    return Route(
        dst=dst,
        oif=msg.get("RTA_OIF"),
        gateway=ip_address(gateway) if gateway else None,
        protocol=msg["proto"],
        scope=msg["scope"],
        onlink=bool(msg["flags"] & RTNH_F_ONLINK),
        mtu=metrics.get("RTAX_MTU") if metrics is not None else None,
        table=msg.get("RTA_TABLE") or msg["table"],
        kind=msg["type"],
    )


class Netlink:
    """A typed rtnetlink handle on one network namespace; every error is a `DatapathError`.

    Open it with `host()` or `netns()`; it is meant to be short-lived and used by one thread.
    """

    def __init__(self, ipr: Any, where: str) -> None:
        self._ipr = ipr
        self.where = where

    def close(self) -> None:
        self._ipr.close()

    def _dump(self, request: Any, msg_type: int) -> list[Any]:
        """A dump the kernel filters by the request's header and attributes.

        pyroute2's own ``dump`` commands fetch everything and filter in Python, which
        costs time in proportion to every address, neighbour and route on the host. With
        strict checking the kernel filters instead. Caveat: pyroute2 ignores the error
        code the kernel puts in NLMSG_DONE, so a rejected filter (e.g. a vanished ifindex)
        reads as an empty result; the writes that follow then fail loudly.
        """
        core = self._ipr.asyncore

        async def collect() -> list[Any]:
            response = await core.nlm_request(request, msg_type, NLM_F_REQUEST | NLM_F_DUMP)
            return [msg async for msg in response]

        return core.event_loop.run_until_complete(collect())  # type: ignore[no-any-return]

    # links

    def link(self, ifname: str) -> Link | None:
        try:
            msgs = self._ipr.link("get", ifname=ifname)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise DatapathError(
                f"get link {ifname} in {self.where}: {os.strerror(exc.code)}"
            ) from exc
        return _link(msgs[0])

    def links(self) -> list[Link]:
        with kernel_errors(f"list links in {self.where}"):
            return [_link(m) for m in self._ipr.link("dump")]

    def add_veth(self, ifname: str, peer_ifname: str, peer_netns: str, mtu: int) -> None:
        with kernel_errors(f"create veth {ifname} <-> {peer_netns}/{peer_ifname}"):
            self._ipr.link(
                "add",
                ifname=ifname,
                kind="veth",
                mtu=mtu,
                peer={"ifname": peer_ifname, "net_ns_fd": str(netns_path(peer_netns)), "mtu": mtu},
            )

    def set_link(self, link: Link, **changes: Any) -> None:
        with kernel_errors(f"set {changes} on link {link.ifname} in {self.where}"):
            self._ipr.link("set", index=link.index, **changes)

    def delete_link(self, link: Link) -> None:
        """Delete ``link``; one already gone (e.g. with its dying namespace) is fine."""
        with kernel_errors(f"delete link {link.ifname} in {self.where}"):
            try:
                self._ipr.link("del", index=link.index)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise

    # addresses

    def addresses(self, index: int | None = None) -> list[Address]:
        """Addresses of both families, of one interface or of all."""
        request = ifaddrmsg()
        request["family"] = socket.AF_UNSPEC  # explicitly: pyroute2 may default it to AF_INET
        if index is not None:
            request["index"] = index
        with kernel_errors(f"list addresses in {self.where}"):
            msgs = self._dump(request, RTM_GETADDR)
        return [
            Address(ip_address(m.get("IFA_ADDRESS")), m["prefixlen"], m["scope"], m["index"])
            for m in msgs
        ]

    def add_address(
        self, index: int, ip: IPAddress, prefixlen: int, scope: int = SCOPE_UNIVERSE
    ) -> None:
        with kernel_errors(f"add address {ip}/{prefixlen} on ifindex {index} in {self.where}"):
            self._ipr.addr(
                "add",
                index=index,
                address=str(ip),
                prefixlen=prefixlen,
                scope=scope,
                flags=IFA_F_NODAD if ip.version == 6 else 0,
            )

    def delete_address(self, address: Address) -> None:
        with kernel_errors(f"delete address {address.ip}/{address.prefixlen} in {self.where}"):
            self._ipr.addr(
                "del", index=address.index, address=str(address.ip), prefixlen=address.prefixlen
            )

    # neighbours

    def neighbours(self, index: int) -> list[Neighbour]:
        request = ndmsg()
        request["family"] = socket.AF_UNSPEC
        request["attrs"] = [("NDA_IFINDEX", index)]  # strict check: the header field must be 0
        with kernel_errors(f"list neighbours on ifindex {index} in {self.where}"):
            msgs = self._dump(request, RTM_GETNEIGH)
        return [
            Neighbour(
                ip=ip_address(m.get("NDA_DST")),
                mac=m.get("NDA_LLADDR"),
                permanent=bool(m["state"] & NUD_PERMANENT),
                index=m["ifindex"],
            )
            for m in msgs
            if m.get("NDA_DST") is not None
        ]

    def set_permanent_neighbour(self, index: int, ip: IPAddress, mac: str) -> None:
        with kernel_errors(f"set neighbour {ip} lladdr {mac} on ifindex {index} in {self.where}"):
            self._ipr.neigh(
                "replace",
                dst=str(ip),
                lladdr=mac,
                ifindex=index,
                state=NUD_PERMANENT,
                family=_family(ip),
            )

    def delete_neighbour(self, neighbour: Neighbour) -> None:
        with kernel_errors(f"delete neighbour {neighbour.ip} in {self.where}"):
            self._ipr.neigh(
                "del", dst=str(neighbour.ip), ifindex=neighbour.index, family=_family(neighbour.ip)
            )

    # routes

    def routes(self, table: int = MAIN_TABLE, oif: int | None = None) -> list[Route]:
        """Routes of both families in ``table``, only those via ``oif`` if given."""
        request = rtmsg()
        request["family"] = socket.AF_UNSPEC
        request["table"] = table
        if oif is not None:
            request["attrs"] = [("RTA_OIF", oif)]
        with kernel_errors(f"list routes in {self.where}"):
            return [_route(m) for m in self._dump(request, RTM_GETROUTE)]

    def replace_route(self, route: Route) -> None:
        spec: dict[str, Any] = {
            "dst": str(route.dst),
            "family": _family(route.dst),
            "table": route.table,
            "proto": route.protocol,
            "scope": route.scope,
            "type": route.kind,
        }
        if route.oif is not None:
            spec["oif"] = route.oif
        if route.gateway is not None:
            spec["gateway"] = str(route.gateway)
        if route.onlink:
            spec["flags"] = RTNH_F_ONLINK
        if route.mtu is not None:
            spec["metrics"] = {"mtu": route.mtu}
        with kernel_errors(f"replace route {describe_route(route)} in {self.where}"):
            self._ipr.route("replace", **spec)

    def delete_route(self, route: Route) -> None:
        spec: dict[str, Any] = {
            "dst": str(route.dst),
            "family": _family(route.dst),
            "table": route.table,
            # pyroute2 fills in a default protocol otherwise, and the kernel matches on it.
            "proto": route.protocol,
            "scope": route.scope,
        }
        if route.oif is not None:
            spec["oif"] = route.oif
        if route.gateway is not None:
            spec["gateway"] = str(route.gateway)
        with kernel_errors(f"delete route {describe_route(route)} in {self.where}"):
            self._ipr.route("del", **spec)


def describe_route(route: Route) -> str:
    """The route the way ``ip route`` prints it, for messages and logs."""
    parts = ["unreachable"] if route.kind == RTN_UNREACHABLE else []
    parts.append("default" if route.dst.prefixlen == 0 else str(route.dst))
    if route.gateway is not None:
        parts.append(f"via {route.gateway}")
    if route.oif is not None:
        parts.append(f"oif {route.oif}")
    if route.onlink:
        parts.append("onlink")
    if route.mtu is not None:
        parts.append(f"mtu {route.mtu}")
    return " ".join(parts)


def _open(where: str, **kwargs: Any) -> Netlink:
    with kernel_errors(f"open netlink socket in {where}"):
        # groups=0: these handles only make requests and must not queue multicast events.
        return Netlink(IPRoute(groups=0, strict_check=True, **kwargs), where)


@contextmanager
def host() -> Iterator[Netlink]:
    """A netlink handle on the caller's (host) network namespace."""
    handle = _open("host")
    try:
        yield handle
    finally:
        handle.close()


@contextmanager
def netns(name: str, path: str | Path | None = None) -> Iterator[Netlink]:
    """A netlink handle on namespace ``name`` (or the one at ``path``); its socket is
    opened from inside it."""

    def open_socket() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)  # 0: NETLINK_ROUTE

    sock = run_in_netns(name, open_socket, path)
    try:
        handle = _open(f"netns {name}", fileno=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the IPRoute owns the descriptor now
    try:
        yield handle
    finally:
        handle.close()
