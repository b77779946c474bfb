"""BPF map layouts and typed access to them, in the kernel or in memory.

Theory of operation
-------------------
Three layers, each replaceable on its own:

1. **Layouts** (`flagella.datapath.layouts`). One ctypes ``Structure`` per C struct of ``bpf/flagella.h``,
   each quoting the declaration it mirrors. ``tests/datapath/test_bpf_layout.py``
   compiles the header with bcc and compares every size and offset, so the
   two cannot drift silently. :data:`MAP_SPECS` names each pinned map with its
   type, key, value, flags and default size; the loader compiles the program
   with those sizes and refuses pinned maps that disagree.
2. **Backends** (`flagella.datapath.backends`, :class:`MapBackend`): bytes in, bytes out, with the kernel's
   semantics (update flags, errno on a full hash, LPM longest-prefix lookup,
   LRU eviction, per-CPU values as one slot per CPU).
   :class:`KernelMap` is a pinned map through bpf(2); :class:`DictMap` is
   its in-memory twin for fast tests of code above the datapath. Both pass
   the same tests (``tests/datapath/test_bpf_maps.py``).
3. **Typed wrappers** (this module: :class:`EndpointMap`, :class:`PolicyMap`,
   :class:`IPCache`, :class:`CTMap`, :class:`MetricsMap`, :class:`ConfigMap`,
   :class:`Frag4Map`) take and return frozen dataclasses with Python types
   (ipaddress objects, host-order ports, enums); byte order and padding are
   handled here and nowhere else. :class:`DatapathMaps` bundles them, opened
   from a pin directory or made in memory.

Byte order: ``__be16``/``__be32`` fields hold network-order values in native
memory, so they are converted with :func:`_be16`/:func:`_be32`. IPv4
addresses inside 16-byte fields are stored IPv4-mapped (``::ffff:a.b.c.d``).
"""

from __future__ import annotations

import ctypes
import ipaddress
import secrets
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntFlag
from pathlib import Path

from flagella.datapath._bpfsys import BPF_ANY, BPF_EXIST, BPF_NOEXIST, MapType
from flagella.datapath.backends import DictMap, KernelMap, MapBackend, _slot
from flagella.datapath.entries import (
    Direction,
    EndpointRow,
    PolicyEntry,
    PolicyKey,
    PolicyValue,
    Verdict,
)
from flagella.datapath.layouts import (
    IDENTITY_WORLD,
    MAP_SPECS,
    NSEC_PER_SEC,
    CtEntryStruct,
    CtKeyStruct,
    DpConfigStruct,
    EndpointInfoStruct,
    Frag4KeyStruct,
    Frag4PortsStruct,
    Frag6KeyStruct,
    IPAddress,
    Ipcache4KeyStruct,
    Ipcache6KeyStruct,
    IPNetwork,
    MapSpec,
    MetricsKeyStruct,
    MetricsValueStruct,
    PolicyEntryStruct,
    PolicyKeyStruct,
    RemoteInfoStruct,
    _addr16,
    _be16,
    _be32,
    _from_addr16,
    _from_be16,
    _from_be32,
    _pack,
    _unpack,
)
from flagella.errors import DatapathError
from flagella.policy.mapstate import port_blocks

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "MAP_SPECS",
    "ConfigMap",
    "CTMap",
    "CtEntry",
    "CtFlags",
    "CtKey",
    "DatapathConfig",
    "DatapathMaps",
    "DictMap",
    "Direction",
    "EndpointRow",
    "EndpointMap",
    "Frag4Map",
    "Frag6Key",
    "Frag6Map",
    "IPCache",
    "KernelMap",
    "MapBackend",
    "MapSpec",
    "MetricKey",
    "MetricValue",
    "MetricsMap",
    "PolicyKey",
    "PolicyMap",
    "PolicyEntry",
    "PolicyValue",
    "RemoteInfo",
    "Verdict",
    "policy_keys_for_port_range",
    "port_range_blocks",
    "wild_mask",
]

# --------------------------------------------------------------------------------------------
# Typed values
# --------------------------------------------------------------------------------------------


class CtFlags(IntFlag):
    SEEN_NON_SYN = 0x1
    CLOSING_FWD = 0x2
    CLOSING_REV = 0x4
    DENIED = 0x8  # tombstone of a flow that policy denies (see flagella.h)


@dataclass(frozen=True)
class RemoteInfo:
    identity: int
    flags: int = 0


@dataclass(frozen=True)
class CtKey:
    """A conntrack key: the tuple of the packet that created the entry, in its direction."""

    ep_id: int
    egress: bool
    proto: int
    saddr: IPAddress
    daddr: IPAddress
    sport: int  # host order; ICMP echo: the echo id
    dport: int

    def _struct(self) -> CtKeyStruct:
        s = CtKeyStruct(
            ep_id=self.ep_id,
            egress=int(self.egress),
            proto=self.proto,
            sport=_be16(self.sport),
            dport=_be16(self.dport),
        )
        s.saddr[:] = list(_addr16(self.saddr))
        s.daddr[:] = list(_addr16(self.daddr))
        return s

    @classmethod
    def _from(cls, s: CtKeyStruct) -> CtKey:
        return cls(
            s.ep_id,
            bool(s.egress),
            s.proto,
            _from_addr16(bytes(s.saddr)),
            _from_addr16(bytes(s.daddr)),
            _from_be16(s.sport),
            _from_be16(s.dport),
        )

    def reversed(self) -> CtKey:
        """The key a reply is looked up with: other direction, addresses and ports swapped."""
        return CtKey(
            self.ep_id, not self.egress, self.proto, self.daddr, self.saddr, self.dport, self.sport
        )


@dataclass(frozen=True)
class CtEntry:
    expires_ns: int  # absolute CLOCK_MONOTONIC (the datapath's coarse clock: up to one tick behind)
    packets: int
    bytes: int
    flags: CtFlags
    verdict_gen: int = 0  # config generation of the cached pass verdict; 0 = none

    def alive(self, now_ns: int) -> bool:
        return self.expires_ns > now_ns


@dataclass(frozen=True)
class DatapathConfig:
    """The ``config`` map: conntrack lifetimes (Cilium 1.1's), feature flags, and the
    proxy re-entry device that ingress redirects go through (ifindex 0: none, the proxy
    is off; an ingress REDIRECT is then only marked and passes, like an egress one)."""

    ct_tcp_ns: int = 21600 * NSEC_PER_SEC
    ct_syn_ns: int = 60 * NSEC_PER_SEC
    ct_non_tcp_ns: int = 60 * NSEC_PER_SEC
    ct_closing_ns: int = 10 * NSEC_PER_SEC
    trace_new_flows: bool = False
    reentry_ifindex: int = 0
    reentry_mac: bytes = bytes(6)

    def __post_init__(self) -> None:
        if len(self.reentry_mac) != 6:
            raise DatapathError(f"config.reentry_mac: {self.reentry_mac.hex()} is not 6 bytes")

    def _struct(self) -> DpConfigStruct:
        return DpConfigStruct(
            ct_tcp_ns=self.ct_tcp_ns,
            ct_syn_ns=self.ct_syn_ns,
            ct_non_tcp_ns=self.ct_non_tcp_ns,
            ct_closing_ns=self.ct_closing_ns,
            flags=1 if self.trace_new_flows else 0,
            reentry_ifindex=self.reentry_ifindex,
            reentry_mac=(ctypes.c_uint8 * 6)(*self.reentry_mac),
        )

    @classmethod
    def _from(cls, s: DpConfigStruct) -> DatapathConfig:
        d = cls()
        return cls(
            s.ct_tcp_ns or d.ct_tcp_ns,
            s.ct_syn_ns or d.ct_syn_ns,
            s.ct_non_tcp_ns or d.ct_non_tcp_ns,
            s.ct_closing_ns or d.ct_closing_ns,
            bool(s.flags & 1),
            s.reentry_ifindex,
            bytes(s.reentry_mac),
        )


@dataclass(frozen=True)
class MetricKey:
    reason: int  # 0 forwarded, else the drop reason (see events.DropReason)
    direction: Direction


@dataclass(frozen=True)
class MetricValue:
    packets: int
    bytes: int


@dataclass(frozen=True)
class Frag4Key:
    ep_id: int
    egress: bool
    proto: int
    ip_id: int  # host order
    saddr: ipaddress.IPv4Address
    daddr: ipaddress.IPv4Address


@dataclass(frozen=True)
class Frag6Key:
    ep_id: int
    egress: bool
    proto: int  # the fragment header's Next Header
    frag_id: int  # host order
    saddr: ipaddress.IPv6Address
    daddr: ipaddress.IPv6Address


# --------------------------------------------------------------------------------------------
# Conversions between the vocabulary (flagella.datapath.entries) and the layouts
# --------------------------------------------------------------------------------------------


def _endpoint_struct(row: EndpointRow) -> EndpointInfoStruct:
    s = EndpointInfoStruct(
        ep_id=row.ep_id,
        identity=row.identity,
        flags=(1 if row.enforce_ingress else 0) | (2 if row.enforce_egress else 0),
        ingress_wild_mask=row.ingress_wild_mask,
        egress_wild_mask=row.egress_wild_mask,
        ipv4=_be32(row.ipv4) if row.ipv4 is not None else 0,
    )
    if row.ipv6 is not None:
        s.ipv6[:] = list(row.ipv6.packed)
    return s


def _endpoint_from(s: EndpointInfoStruct) -> EndpointRow:
    v6 = bytes(s.ipv6)
    return EndpointRow(
        ep_id=s.ep_id,
        identity=s.identity,
        enforce_ingress=bool(s.flags & 1),
        enforce_egress=bool(s.flags & 2),
        ingress_wild_mask=s.ingress_wild_mask,
        egress_wild_mask=s.egress_wild_mask,
        ipv4=_from_be32(s.ipv4) if s.ipv4 else None,
        ipv6=ipaddress.IPv6Address(v6) if any(v6) else None,
    )


def _key_struct(k: PolicyKey) -> PolicyKeyStruct:
    return PolicyKeyStruct(
        ep_id=k.ep_id, identity=k.identity, egress=int(k.egress),
        protocol=k.protocol, wild_bits=k.wild_bits, port=k.port,
    )


def _key_from(s: PolicyKeyStruct) -> PolicyKey:
    return PolicyKey(s.ep_id, s.identity, bool(s.egress), s.protocol, s.port, s.wild_bits)


def _entry_struct(verdict: Verdict, proxy_port: int, precedence: int) -> PolicyEntryStruct:
    """A fresh entry: counters start at zero."""
    return PolicyEntryStruct(verdict=int(verdict), proxy_port=proxy_port, precedence=precedence)


def _entry_from(s: PolicyEntryStruct) -> PolicyEntry:
    return PolicyEntry(Verdict(s.verdict), s.proxy_port, s.packets, s.bytes, s.precedence)



# --------------------------------------------------------------------------------------------
# Port ranges
# --------------------------------------------------------------------------------------------


#: The same decomposition the control plane uses (one implementation, in the policy core).
port_range_blocks = port_blocks


def policy_keys_for_port_range(
    ep_id: int, identity: int, egress: bool, protocol: int, first: int, last: int
) -> list[PolicyKey]:
    return [
        PolicyKey(ep_id, identity, egress, protocol, port, bits)
        for port, bits in port_range_blocks(first, last)
    ]


def wild_mask(keys: Iterable[PolicyKey], egress: bool) -> int:
    """The ``*_wild_mask`` of an endpoint for one direction: bit n for every wild_bits n in use
    by protocol-specific keys (protocol-0 keys are always probed)."""
    mask = 0
    for k in keys:
        if k.egress == egress and k.protocol != 0:
            mask |= 1 << k.wild_bits
    return mask


# --------------------------------------------------------------------------------------------
# Typed wrappers
# --------------------------------------------------------------------------------------------


class _Typed:
    def __init__(self, backend: MapBackend) -> None:
        self.backend = backend

    def clear(self) -> int:
        """Delete every entry (tests, endpoint teardown); returns how many."""
        return self.backend.delete_many(list(self.backend.keys()))

    def __len__(self) -> int:
        return sum(1 for _ in self.backend.keys())  # noqa: SIM118 (a MapBackend, not a dict)


class EndpointMap(_Typed):
    """``endpoints``: host-side veth ifindex -> :class:`EndpointRow`."""

    @staticmethod
    def _key(ifindex: int) -> bytes:
        return ifindex.to_bytes(4, sys.byteorder)

    def set(self, ifindex: int, info: EndpointRow) -> None:
        self.backend.update(self._key(ifindex), _pack(_endpoint_struct(info)))

    def get(self, ifindex: int) -> EndpointRow | None:
        raw = self.backend.lookup(self._key(ifindex))
        return None if raw is None else _endpoint_from(_unpack(EndpointInfoStruct, raw))

    def delete(self, ifindex: int) -> bool:
        return self.backend.delete(self._key(ifindex))

    def items(self) -> dict[int, EndpointRow]:
        return {
            int.from_bytes(k, sys.byteorder): _endpoint_from(_unpack(EndpointInfoStruct, v))
            for k, v in self.backend.items()
        }


class PolicyMap(_Typed):
    """``policy``: :class:`PolicyKey` -> :class:`PolicyEntry` (verdict, proxy port, counters)."""

    def set(
        self, key: PolicyKey, verdict: Verdict, proxy_port: int = 0, precedence: int = 0
    ) -> None:
        """Write one entry; its counters start at zero."""
        self.backend.update(_pack(_key_struct(key)), _pack(_entry_struct(verdict, proxy_port, precedence)))

    def set_many(
        self, entries: Mapping[PolicyKey, tuple[Verdict, int] | tuple[Verdict, int, int]]
    ) -> int:
        """Write many entries: (verdict, proxy port[, precedence]) each."""
        return self.backend.update_many(
            (_pack(_key_struct(k)), _pack(_entry_struct(v[0], v[1], v[2] if len(v) > 2 else 0)))
            for k, v in entries.items()
        )

    def get(self, key: PolicyKey) -> PolicyEntry | None:
        raw = self.backend.lookup(_pack(_key_struct(key)))
        return None if raw is None else _entry_from(_unpack(PolicyEntryStruct, raw))

    def delete(self, key: PolicyKey) -> bool:
        return self.backend.delete(_pack(_key_struct(key)))

    def delete_many(self, keys: Iterable[PolicyKey]) -> int:
        """Delete entries, in batches where the kernel can; returns how many were present."""
        return self.backend.delete_many([_pack(_key_struct(k)) for k in keys])

    def items(self) -> dict[PolicyKey, PolicyEntry]:
        return {
            _key_from(_unpack(PolicyKeyStruct, k)): _entry_from(
                _unpack(PolicyEntryStruct, v)
            )
            for k, v in self.backend.items()
        }

    def entries(self, ep_id: int) -> dict[PolicyKey, PolicyEntry]:
        return {k: v for k, v in self.items().items() if k.ep_id == ep_id}

    def sync_endpoint(
        self, ep_id: int, desired: Mapping[PolicyKey, tuple[Verdict, int]]
    ) -> tuple[int, int]:
        """Make ``ep_id``'s entries equal ``desired`` {key: (verdict, proxy_port)}.

        New and changed entries are written before stale ones are deleted, so an allowed flow
        never sees a gap; unchanged entries keep their counters. Returns (written, deleted).
        """
        for k in desired:
            if k.ep_id != ep_id:
                raise ValueError(f"{k}: not endpoint {ep_id}")
        current = self.entries(ep_id)
        changed = {
            k: vp
            for k, vp in desired.items()
            if k not in current or (current[k].verdict, current[k].proxy_port) != vp
        }
        written = self.set_many(changed)
        stale = [_pack(_key_struct(k)) for k in current if k not in desired]
        return written, self.backend.delete_many(stale)

    def delete_endpoint(self, ep_id: int) -> int:
        return self.backend.delete_many([_pack(_key_struct(k)) for k in self.entries(ep_id)])


class IPCache:
    """``ipcache4``/``ipcache6``: prefix -> identity, longest prefix wins; a miss is world (2)."""

    def __init__(self, v4: MapBackend, v6: MapBackend) -> None:
        self.v4 = v4
        self.v6 = v6

    @staticmethod
    def _key(net: IPNetwork) -> tuple[bool, bytes]:
        if isinstance(net, ipaddress.IPv4Network):
            s4 = Ipcache4KeyStruct(prefixlen=net.prefixlen, addr=_be32(net.network_address))
            return False, _pack(s4)
        s6 = Ipcache6KeyStruct(prefixlen=net.prefixlen)
        s6.addr[:] = list(net.network_address.packed)
        return True, _pack(s6)

    def _backend(self, v6: bool) -> MapBackend:
        return self.v6 if v6 else self.v4

    def set(self, prefix: str | IPNetwork | IPAddress, identity: int, flags: int = 0) -> None:
        v6, key = self._key(ipaddress.ip_network(prefix))
        self._backend(v6).update(key, _pack(RemoteInfoStruct(identity=identity, flags=flags)))

    def set_many(self, entries: Mapping[str | IPNetwork | IPAddress, int]) -> int:
        by_family: dict[bool, list[tuple[bytes, bytes]]] = {False: [], True: []}
        for prefix, identity in entries.items():
            v6, key = self._key(ipaddress.ip_network(prefix))
            by_family[v6].append((key, _pack(RemoteInfoStruct(identity=identity))))
        return sum(self._backend(v6).update_many(p) for v6, p in by_family.items())

    def delete(self, prefix: str | IPNetwork | IPAddress) -> bool:
        v6, key = self._key(ipaddress.ip_network(prefix))
        return self._backend(v6).delete(key)

    def lookup(self, addr: str | IPAddress) -> RemoteInfo | None:
        """The entry of the longest prefix containing ``addr``, as the datapath sees it."""
        a = ipaddress.ip_address(addr)
        v6, key = self._key(ipaddress.ip_network(a))
        raw = self._backend(v6).lookup(key)
        if raw is None:
            return None
        s = _unpack(RemoteInfoStruct, raw)
        return RemoteInfo(s.identity, s.flags)

    def identity_of(self, addr: str | IPAddress) -> int:
        info = self.lookup(addr)
        return IDENTITY_WORLD if info is None else info.identity

    def items(self) -> dict[IPNetwork, RemoteInfo]:
        out: dict[IPNetwork, RemoteInfo] = {}
        for k, v in self.v4.items():
            s4 = _unpack(Ipcache4KeyStruct, k)
            r = _unpack(RemoteInfoStruct, v)
            out[ipaddress.IPv4Network((_from_be32(s4.addr), s4.prefixlen))] = RemoteInfo(
                r.identity, r.flags
            )
        for k, v in self.v6.items():
            s6 = _unpack(Ipcache6KeyStruct, k)
            r = _unpack(RemoteInfoStruct, v)
            out[ipaddress.IPv6Network((bytes(s6.addr), s6.prefixlen))] = RemoteInfo(
                r.identity, r.flags
            )
        return out

    def clear(self) -> int:
        return self.v4.delete_many(list(self.v4.keys())) + self.v6.delete_many(list(self.v6.keys()))


class CTMap(_Typed):
    """``ct``: :class:`CtKey` -> :class:`CtEntry`. The datapath creates and refreshes entries;
    user space reads them, deletes them, and sweeps expired ones (:meth:`gc`)."""

    def get(self, key: CtKey) -> CtEntry | None:
        raw = self.backend.lookup(_pack(key._struct()))
        return None if raw is None else self._entry(raw)

    @staticmethod
    def _entry(raw: bytes) -> CtEntry:
        s = _unpack(CtEntryStruct, raw)
        return CtEntry(s.expires_ns, s.packets, s.bytes, CtFlags(s.flags), s.verdict_gen)

    def put(self, key: CtKey, entry: CtEntry) -> None:
        """Write an entry (tests, state restore)."""
        self.backend.update(
            _pack(key._struct()),
            _pack(
                CtEntryStruct(
                    expires_ns=entry.expires_ns,
                    packets=entry.packets,
                    bytes=entry.bytes,
                    flags=int(entry.flags),
                    verdict_gen=entry.verdict_gen,
                )
            ),
        )

    def delete(self, key: CtKey) -> bool:
        return self.backend.delete(_pack(key._struct()))

    def items(self) -> dict[CtKey, CtEntry]:
        return {
            CtKey._from(_unpack(CtKeyStruct, k)): self._entry(v) for k, v in self.backend.items()
        }

    def entries(self, ep_id: int) -> dict[CtKey, CtEntry]:
        return {k: v for k, v in self.items().items() if k.ep_id == ep_id}

    def delete_endpoint(self, ep_id: int) -> int:
        return self.backend.delete_many([_pack(k._struct()) for k in self.entries(ep_id)])

    def gc(self, now_ns: int) -> int:
        """Delete entries expired at ``now_ns`` (CLOCK_MONOTONIC, e.g. ``time.monotonic_ns()``)."""
        return self.backend.delete_many(
            [k for k, v in self.backend.items() if _unpack(CtEntryStruct, v).expires_ns <= now_ns]
        )


class MetricsMap(_Typed):
    """``metrics`` and ``forwarded``: (reason, direction) -> packets/bytes, summed over CPUs.

    Drops count in the ``metrics`` hash under their reason; forwarded packets (reason 0)
    in the ``forwarded`` per-CPU array, indexed by direction, whose lookup the verifier
    inlines (a hash lookup on every passed packet cost about 10 ns). Older builds counted
    forwarded packets in the hash too: both are added up."""

    def __init__(self, backend: MapBackend, forwarded: MapBackend) -> None:
        super().__init__(backend)
        self.forwarded = forwarded

    @staticmethod
    def _sum(backend: MapBackend, raw: bytes) -> MetricValue:
        slot = _slot(ctypes.sizeof(MetricsValueStruct))
        packets = bytes_ = 0
        for cpu in range(backend.cpus):
            s = _unpack(MetricsValueStruct, raw[cpu * slot :])
            packets += s.packets
            bytes_ += s.bytes
        return MetricValue(packets, bytes_)

    def read(self) -> dict[MetricKey, MetricValue]:
        out = {}
        for k, v in self.backend.items():
            key = _unpack(MetricsKeyStruct, k)
            out[MetricKey(key.reason, Direction(key.dir))] = self._sum(self.backend, v)
        for direction in Direction:
            raw = self.forwarded.lookup(int(direction).to_bytes(4, sys.byteorder))
            fwd = MetricValue(0, 0) if raw is None else self._sum(self.forwarded, raw)
            if fwd.packets or fwd.bytes:
                fkey = MetricKey(0, direction)
                old = out.get(fkey, MetricValue(0, 0))
                out[fkey] = MetricValue(old.packets + fwd.packets, old.bytes + fwd.bytes)
        return out

    def clear(self) -> int:
        zero = bytes(self.forwarded.value_size if self.forwarded.cpus == 1 else
                     _slot(self.forwarded.value_size) * self.forwarded.cpus)
        for k in list(self.forwarded.keys()):
            self.forwarded.update(k, zero)
        return super().clear()

    def get(self, reason: int, direction: Direction) -> MetricValue:
        return self.read().get(MetricKey(reason, direction), MetricValue(0, 0))


class ConfigMap(_Typed):
    """``config``: the single :class:`DatapathConfig`, and the verdict cache generation.

    The generation is not configuration: :meth:`set` keeps it, and it only moves forward
    (:meth:`bump_generation`), so a conntrack entry's cached verdict can never match a
    generation that was current again after a change. :meth:`clear` (with the conntrack
    entries, as :meth:`DatapathMaps.clear` does) resets it to 0: no caching until a bump."""

    _KEY = (0).to_bytes(4, sys.byteorder)

    def _raw(self) -> DpConfigStruct:
        raw = self.backend.lookup(self._KEY)
        return DpConfigStruct() if raw is None else _unpack(DpConfigStruct, raw)

    def get(self) -> DatapathConfig:
        raw = self.backend.lookup(self._KEY)
        return (
            DatapathConfig() if raw is None else DatapathConfig._from(_unpack(DpConfigStruct, raw))
        )

    def set(self, config: DatapathConfig) -> None:
        s = config._struct()
        s.generation = self._raw().generation
        self.backend.update(self._KEY, _pack(s))

    @property
    def generation(self) -> int:
        return int(self._raw().generation)

    def bump_generation(self) -> int:
        """Invalidate every cached verdict: the next packet of each flow is checked against
        policy again. Call after the maps changed. Returns the new generation (never 0;
        the first one is random, so entries of a lost config map cannot match it)."""
        s = self._raw()
        g = s.generation
        s.generation = ((g + 1) & 0xFFFFFFFF or 1) if g else (secrets.randbits(31) + 1)
        self.backend.update(self._KEY, _pack(s))
        return int(s.generation)

    def clear(self) -> int:
        self.backend.update(self._KEY, _pack(DatapathConfig()._struct()))
        return 0


class Frag4Map(_Typed):
    """``frag4``: ports recorded by first IPv4 fragments that passed."""

    def items(self) -> dict[Frag4Key, tuple[int, int]]:
        out = {}
        for k, v in self.backend.items():
            s = _unpack(Frag4KeyStruct, k)
            p = _unpack(Frag4PortsStruct, v)
            out[
                Frag4Key(
                    s.ep_id,
                    bool(s.egress),
                    s.proto,
                    _from_be16(s.ip_id),
                    _from_be32(s.saddr),
                    _from_be32(s.daddr),
                )
            ] = (_from_be16(p.sport), _from_be16(p.dport))
        return out

    def forget(self, ep_id: int, addrs: Collection[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> int:
        """Delete the entries of ``ep_id`` and those naming any of ``addrs``."""
        stale = [
            k for k, v in self.backend.items()
            if (s := _unpack(Frag4KeyStruct, k)).ep_id == ep_id
            or _from_be32(s.saddr) in addrs or _from_be32(s.daddr) in addrs
        ]
        return self.backend.delete_many(stale)


class Frag6Map(_Typed):
    """``frag6``: ports recorded by first IPv6 fragments that passed."""

    def items(self) -> dict[Frag6Key, tuple[int, int]]:
        out = {}
        for k, v in self.backend.items():
            s = _unpack(Frag6KeyStruct, k)
            p = _unpack(Frag4PortsStruct, v)
            key = Frag6Key(
                s.ep_id,
                bool(s.egress),
                s.proto,
                int.from_bytes(s.frag_id.to_bytes(4, sys.byteorder), "big"),
                ipaddress.IPv6Address(bytes(s.saddr)),
                ipaddress.IPv6Address(bytes(s.daddr)),
            )
            out[key] = (_from_be16(p.sport), _from_be16(p.dport))
        return out

    def forget(self, ep_id: int, addrs: Collection[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> int:
        """Delete the entries of ``ep_id`` and those naming any of ``addrs``."""
        stale = [
            k for k, _ in self.backend.items()
            if (s := _unpack(Frag6KeyStruct, k)).ep_id == ep_id
            or ipaddress.IPv6Address(bytes(s.saddr)) in addrs
            or ipaddress.IPv6Address(bytes(s.daddr)) in addrs
        ]
        return self.backend.delete_many(stale)


@dataclass
class DatapathMaps:
    """All typed maps of one datapath, from pins or in memory."""

    endpoints: EndpointMap
    policy: PolicyMap
    ipcache: IPCache
    ct: CTMap
    metrics: MetricsMap
    config: ConfigMap
    frag4: Frag4Map
    frag6: Frag6Map
    _backends: list[MapBackend] = field(default_factory=list, repr=False)

    @classmethod
    def _from_backends(cls, b: Mapping[str, MapBackend]) -> DatapathMaps:
        return cls(
            endpoints=EndpointMap(b["endpoints"]),
            policy=PolicyMap(b["policy"]),
            ipcache=IPCache(b["ipcache4"], b["ipcache6"]),
            ct=CTMap(b["ct"]),
            metrics=MetricsMap(b["metrics"], b["forwarded"]),
            config=ConfigMap(b["config"]),
            frag4=Frag4Map(b["frag4"]),
            frag6=Frag6Map(b["frag6"]),
            _backends=list(b.values()),
        )

    @classmethod
    def open_pinned(
        cls, pin_dir: str | Path, specs: Mapping[str, MapSpec] = MAP_SPECS
    ) -> DatapathMaps:
        """Open every state map pinned under ``pin_dir``, checking each layout."""
        opened: dict[str, MapBackend] = {}
        try:
            for name, spec in specs.items():
                if spec.type == MapType.RINGBUF:
                    continue  # read by events.RingBufferReader
                opened[name] = KernelMap.open_pinned(Path(pin_dir) / name, spec)
        except BaseException:
            for m in opened.values():
                m.close()
            raise
        return cls._from_backends(opened)

    @classmethod
    def in_memory(cls, specs: Mapping[str, MapSpec] = MAP_SPECS, cpus: int = 2) -> DatapathMaps:
        """Dict-backed twins (a small per-CPU count keeps the per-CPU summing honest)."""
        return cls._from_backends(
            {
                name: DictMap(spec, cpus)
                for name, spec in specs.items()
                if spec.type != MapType.RINGBUF
            }
        )

    def clear(self) -> None:
        """Empty every map (the config map returns to defaults)."""
        for m in (
            self.endpoints,
            self.policy,
            self.ipcache,
            self.ct,
            self.metrics,
            self.config,
            self.frag4,
            self.frag6,
        ):
            m.clear()

    def close(self) -> None:
        for b in self._backends:
            b.close()
