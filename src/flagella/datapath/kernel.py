"""The kernel implementation of the agent's `Datapath` port.

It composes the three kernel-facing modules and adds the host plumbing
none of them owns:

* `loader` compiles (once per source hash) and attaches the programs (tcx
  links, or clsact filters),
  and opens the pinned maps; `maps` gives typed access to them;
* `links` creates pods (netns + veth + addresses + routes) with netlink;
* here: the BPF filesystem mount, the datapath config (conntrack
  lifetimes), and the nftables rule that marks packets the host itself
  sends to pods (``0xc00``), which is how the program tells host traffic
  (identity 1) from traffic SNATed to a node address (world).

The maps are exposed as mutable mappings of the plain values the control
plane computes (`flagella.datapath.desired`), so the agent's diffing and
drift repair are the same code over this class and over `MemoryDatapath`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import threading
import time
from collections.abc import Collection, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagella.datapath import maps as m
from flagella.datapath import redirect
from flagella.datapath.entries import EndpointRow, PolicyEntry, PolicyKey, PolicyValue
from flagella.datapath.events import reason_text
from flagella.datapath.links import LinkSettings, PodNetwork, ensure_node_routes, prepare_host
from flagella.datapath.loader import DatapathSettings, load_datapath
from flagella.datapath.port import Counters, CTRow, IPAddress, IPNetwork, PodInfo
from flagella.errors import DatapathError
from flagella.policy.api import PROTOCOL_NAMES

NFT_TABLE = "flagella"
HOST_MARK = 0xC00
NSEC = 1_000_000_000


def ensure_bpffs() -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)


def install_host_mark(table: str = NFT_TABLE) -> None:
    """Mark packets the host sends into pods, so the datapath can tell host from world.

    The proxy's upstream (mark 0x300, see `flagella.datapath.redirect`) is left alone:
    it carries its client's address, and the client is its peer, not the host."""
    rules = f"""
table inet {table} {{
  chain output {{
    type filter hook output priority mangle; policy accept;
    oifname "fl*" meta mark & {redirect.MARK_MASK:#x} != {redirect.MARK_FROM_PROXY:#x} meta mark set meta mark | {HOST_MARK:#x}
  }}
}}
"""
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
    proc = subprocess.run(["nft", "-f", "-"], input=rules, text=True, capture_output=True)
    if proc.returncode != 0:
        raise DatapathError(f"nftables host-mark rule: {proc.stderr.strip()}")


def remove_host_mark(table: str = NFT_TABLE) -> None:
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)


class _PolicyView(MutableMapping[PolicyKey, PolicyValue]):
    def __init__(self, policy: m.PolicyMap) -> None:
        self.map = policy

    def __getitem__(self, key: PolicyKey) -> PolicyValue:
        v = self.map.get(key)
        if v is None:
            raise KeyError(key)
        return v.value

    def __setitem__(self, key: PolicyKey, value: PolicyValue) -> None:
        self.map.set(key, value.verdict, value.proxy_port, value.precedence)

    def update(self, other: Any = (), /, **kw: Any) -> None:  # batched
        items = other.items() if isinstance(other, Mapping) else other
        batch = {k: (v.verdict, v.proxy_port, v.precedence) for k, v in items}
        if batch:
            self.map.set_many(batch)

    def __delitem__(self, key: PolicyKey) -> None:
        if not self.map.delete(key):
            raise KeyError(key)

    def items_with_counters(self) -> dict[PolicyKey, PolicyEntry]:
        return self.map.items()

    def items(self) -> list[tuple[PolicyKey, PolicyValue]]:  # type: ignore[override]
        return [(k, v.value) for k, v in self.map.items().items()]

    def __iter__(self) -> Iterator[PolicyKey]:
        return iter(list(self.map.items()))

    def __len__(self) -> int:
        return len(self.map)


class _EndpointView(MutableMapping[int, EndpointRow]):
    def __init__(self, endpoints: m.EndpointMap) -> None:
        self.map = endpoints

    def __getitem__(self, ifindex: int) -> EndpointRow:
        v = self.map.get(ifindex)
        if v is None:
            raise KeyError(ifindex)
        return v

    def __setitem__(self, ifindex: int, row: EndpointRow) -> None:
        self.map.set(ifindex, row)

    def __delitem__(self, ifindex: int) -> None:
        if not self.map.delete(ifindex):
            raise KeyError(ifindex)

    def items(self) -> list[tuple[int, EndpointRow]]:  # type: ignore[override]
        return list(self.map.items().items())

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.map.items()))

    def __len__(self) -> int:
        return len(self.map)


class _IPCacheView(MutableMapping[IPNetwork, int]):
    def __init__(self, ipcache: m.IPCache) -> None:
        self.map = ipcache

    def __getitem__(self, net: IPNetwork) -> int:
        for k, v in self.map.items().items():
            if k == net:
                return v.identity
        raise KeyError(net)

    def get(self, net: IPNetwork, default: Any = None) -> Any:
        try:
            return self[net]
        except KeyError:
            return default

    def __setitem__(self, net: IPNetwork, identity: int) -> None:
        self.map.set(net, identity)

    def __delitem__(self, net: IPNetwork) -> None:
        if not self.map.delete(net):
            raise KeyError(net)

    def pop(self, net: IPNetwork, default: Any = None) -> Any:
        """Delete without reading first (an LPM map has no exact lookup; a read scans it).

        Returns the prefix itself, not its identity, when it was present."""
        return net if self.map.delete(net) else default

    def items(self) -> list[tuple[IPNetwork, int]]:  # type: ignore[override]
        return [(k, v.identity) for k, v in self.map.items().items()]

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(list(self.map.items()))

    def __len__(self) -> int:
        return len(self.map.items())


@dataclass(frozen=True)
class KernelSettings:
    """What the kernel datapath needs to know (the agent maps its settings onto this)."""

    bpf_dir: str
    links: LinkSettings
    ct_tcp_s: int = 21600
    ct_syn_s: int = 60
    ct_non_tcp_s: int = 60
    ct_closing_s: int = 10
    trace_events: bool = False
    attach_mode: str = "auto"  # DatapathSettings.attach
    #: The proxy redirect plumbing to install; None: none, ingress REDIRECTs drop.
    redirect: redirect.RedirectSettings | None = None


class KernelDatapath:
    def __init__(self, settings: KernelSettings) -> None:
        self.link_settings = settings.links
        self.settings = settings
        self.pods = PodNetwork(self.link_settings)
        self._dp: Any = None
        self._events: Any = None
        #: The bump is a read-modify-write of the config map: two endpoints' applies
        #: (different threads) must not both write the same next generation.
        self._generation = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        ensure_bpffs()
        prepare_host(self.link_settings)
        self._dp = load_datapath(
            DatapathSettings(pin_dir=Path(self.settings.bpf_dir), attach=self.settings.attach_mode)
        )
        maps = self._dp.maps
        s = self.settings
        reentry = redirect.install(s.redirect) if s.redirect is not None else None
        maps.config.set(
            m.DatapathConfig(
                ct_tcp_ns=s.ct_tcp_s * NSEC,
                ct_syn_ns=s.ct_syn_s * NSEC,
                ct_non_tcp_ns=s.ct_non_tcp_s * NSEC,
                ct_closing_ns=s.ct_closing_s * NSEC,
                trace_new_flows=self.settings.trace_events,
                reentry_ifindex=reentry.ifindex if reentry else 0,
                reentry_mac=reentry.mac if reentry else bytes(6),
            )
        )
        install_host_mark()
        self.endpoints = _EndpointView(maps.endpoints)
        self.policy = _PolicyView(maps.policy)
        self.ipcache = _IPCacheView(maps.ipcache)
        try:
            self._events = self._dp.events()
        except DatapathError:
            self._events = None

    def stop(self) -> None:
        if self._events is not None:
            self._events.close()
        if self._dp is not None:
            self._dp.close()

    @property
    def build(self) -> str:
        return str(self._dp.build) if self._dp is not None else ""

    @property
    def compiled(self) -> bool:
        return bool(self._dp.compiled) if self._dp is not None else False

    # -- pods ------------------------------------------------------------------------

    def ensure_pod(
        self, name: str, ipv4: ipaddress.IPv4Address, ipv6: ipaddress.IPv6Address | None,
        ifname: str = "eth0", mtu: int | None = None,
    ) -> PodInfo:
        link = self.pods.ensure_pod(name, ipv4, ipv6, ifname, mtu)
        return PodInfo(
            link.netns, link.host_ifname, link.host_ifindex, link.ipv4, link.ipv6,
            link.pod_ifname, link.pod_mac,
        )

    def check_pod_name(self, name: str) -> None:
        self.pods.check_free(name)

    def adopt_netns(self, name: str, path: str, ifname: str) -> None:
        self.pods.adopt_netns(name, path, ifname)

    def host_route_mtu(self) -> int | None:
        return self.pods.host_route_mtu()

    def remove_pod(self, name: str) -> None:
        self.pods.remove_pod(name)

    def list_pods(self) -> list[PodInfo]:
        return [
            PodInfo(p.netns, p.host_ifname, p.host_ifindex, p.ipv4, p.ipv6, p.pod_ifname, p.pod_mac)
            for p in self.pods.list_pods()
        ]

    def host_addresses(self) -> list[IPAddress]:
        return [a for a in self.pods.host_addresses() if not a.is_link_local and not a.is_loopback]

    def set_node_routes(self, routes: dict[IPNetwork, IPAddress]) -> None:
        ensure_node_routes(routes)

    def attach(self, ifindex: int) -> list[str]:
        return list(self._dp.attach(ifindex))

    @property
    def attach_mode(self) -> str:
        return str(self._dp.attach_mode) if self._dp is not None else ""

    def detach(self, ifindex: int) -> None:
        with contextlib.suppress(DatapathError):  # the device is already gone
            self._dp.detach(ifindex)

    def delete_policy_entries(self, keys: Collection[PolicyKey]) -> int:
        return self.policy.map.delete_many(keys)

    def bump_generation(self) -> None:
        """Invalidate the verdicts cached in conntrack entries: call after every change of
        the policy, endpoints or ipcache maps (see struct ct_entry in bpf/flagella.h)."""
        with self._generation:
            self._dp.maps.config.bump_generation()

    # -- reads -------------------------------------------------------------------------

    def policy_counters(self, ep_id: int) -> dict[PolicyKey, tuple[PolicyValue, Counters]]:
        out = {}
        for k, v in self.policy.items_with_counters().items():
            if k.ep_id == ep_id:
                out[k] = (v.value, Counters(v.packets, v.bytes))
        return out

    def ct_entries(self) -> Iterator[CTRow]:
        for k, v in self._dp.maps.ct.items().items():
            yield CTRow(
                k.ep_id, bool(k.egress), k.proto, k.saddr, k.daddr, k.sport, k.dport,
                v.expires_ns, v.packets, v.bytes, int(v.flags),
            )

    def ct_delete(self, rows: list[CTRow]) -> int:
        n = 0
        for r in rows:
            key = m.CtKey(r.ep_id, r.egress, r.proto, r.saddr, r.daddr, r.sport, r.dport)
            n += bool(self._dp.maps.ct.delete(key))
        return n

    def frag_forget(self, ep_id: int, addrs: Collection[IPAddress]) -> int:
        return int(self._dp.maps.frag4.forget(ep_id, addrs) + self._dp.maps.frag6.forget(ep_id, addrs))

    def metrics(self) -> dict[tuple[int, int], Counters]:
        return {
            (k.reason, int(k.direction)): Counters(v.packets, v.bytes)
            for k, v in self._dp.maps.metrics.read().items()
        }

    def poll_events(self, timeout_ms: int) -> list[dict[str, object]]:
        if self._events is None:
            time.sleep(timeout_ms / 1000)
            return []
        out = []
        for ev in self._events.poll(timeout_ms / 1000):
            out.append(event_json(ev))
        return out

    def now_ns(self) -> int:
        return time.monotonic_ns()


def event_json(ev: Any) -> dict[str, object]:
    kind = "drop" if int(ev.type) == 1 else "trace"
    proto = int(ev.proto)
    src = f"{ev.saddr}:{ev.sport}" if ev.saddr is not None else "?"
    dst = f"{ev.daddr}:{ev.dport}" if ev.daddr is not None else "?"
    return {
        "type": kind,
        "reason": int(ev.reason),
        "reason_name": reason_text(int(ev.reason)) if kind == "drop" else "",
        "direction": "ingress" if int(ev.direction) == 1 else "egress",
        "ep_id": int(ev.ep_id),
        "src_identity": int(ev.src_identity),
        "dst_identity": int(ev.dst_identity),
        "proto": proto,
        "proto_name": PROTOCOL_NAMES.get(proto, str(proto)),
        "src": src,
        "dst": dst,
        "ct_state": str(getattr(ev.ct_state, "name", ev.ct_state)).lower(),
        "len": int(ev.length),
    }


