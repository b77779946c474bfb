"""BPF map layouts and typed access to them, in the kernel or in memory.

Theory of operation
-------------------
Three layers, each replaceable on its own:

1. **Layouts.** One ctypes ``Structure`` per C struct of ``bpf/flagella.h``,
   each quoting the declaration it mirrors. ``tests/datapath/test_bpf_layout.py``
   compiles the header with bcc and compares every size and offset, so the
   two cannot drift silently. :data:`MAP_SPECS` names each pinned map with its
   type, key, value, flags and default size; the loader compiles the program
   with those sizes and refuses pinned maps that disagree.
2. **Backends** (:class:`MapBackend`): bytes in, bytes out, with the kernel's
   semantics (update flags, errno on a full hash, LPM longest-prefix lookup,
   LRU eviction, per-CPU values as one slot per CPU).
   :class:`KernelMap` is a pinned map through bpf(2); :class:`DictMap` is
   its in-memory twin for fast tests of code above the datapath. Both pass
   the same tests (``tests/datapath/test_bpf_maps.py``).
3. **Typed wrappers** (:class:`EndpointMap`, :class:`PolicyMap`,
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
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

from flagella.datapath import _bpfsys
from flagella.datapath._bpfsys import BPF_ANY, BPF_EXIST, BPF_NOEXIST, BpfError, MapType
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
    "EndpointInfo",
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
    "PolicyValue",
    "RemoteInfo",
    "Verdict",
    "policy_keys_for_port_range",
    "port_range_blocks",
    "wild_mask",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BPF_F_NO_PREALLOC = 1
IDENTITY_WORLD = 2
NSEC_PER_SEC = 1_000_000_000


# --------------------------------------------------------------------------------------------
# Layouts: each mirrors a struct of bpf/flagella.h and must match it byte for byte.
# --------------------------------------------------------------------------------------------


class EndpointInfoStruct(ctypes.Structure):
    """struct endpoint_info {
        __u32 ep_id; __u32 identity; __u32 flags;
        __u32 ingress_wild_mask; __u32 egress_wild_mask;
        __be32 ipv4; __u8 ipv6[16];
    };"""

    C_NAME: ClassVar[str] = "endpoint_info"
    _fields_ = [
        ("ep_id", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ingress_wild_mask", ctypes.c_uint32),
        ("egress_wild_mask", ctypes.c_uint32),
        ("ipv4", ctypes.c_uint32),
        ("ipv6", ctypes.c_uint8 * 16),
    ]


class PolicyKeyStruct(ctypes.Structure):
    """struct policy_key {
        __u32 ep_id; __u32 identity;
        __u8 egress; __u8 protocol; __u8 wild_bits; __u8 pad;
        __u16 port; __u16 pad2;
    };"""

    C_NAME: ClassVar[str] = "policy_key"
    _fields_ = [
        ("ep_id", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("egress", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("wild_bits", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("pad2", ctypes.c_uint16),
    ]


class PolicyEntryStruct(ctypes.Structure):
    """struct policy_entry {
        __u8 verdict; __u8 pad; __u16 proxy_port; __s32 precedence;
        __u64 packets; __u64 bytes;
    };"""

    C_NAME: ClassVar[str] = "policy_entry"
    _fields_ = [
        ("verdict", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("proxy_port", ctypes.c_uint16),
        ("precedence", ctypes.c_int32),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


class Ipcache4KeyStruct(ctypes.Structure):
    """struct ipcache4_key { __u32 prefixlen; __be32 addr; };"""

    C_NAME: ClassVar[str] = "ipcache4_key"
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class Ipcache6KeyStruct(ctypes.Structure):
    """struct ipcache6_key { __u32 prefixlen; __u8 addr[16]; };"""

    C_NAME: ClassVar[str] = "ipcache6_key"
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class RemoteInfoStruct(ctypes.Structure):
    """struct remote_info { __u32 identity; __u32 flags; };"""

    C_NAME: ClassVar[str] = "remote_info"
    _fields_ = [("identity", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class CtKeyStruct(ctypes.Structure):
    """struct ct_key {
        __u32 ep_id; __u8 egress; __u8 proto; __u16 pad;
        __u8 saddr[16]; __u8 daddr[16];
        __be16 sport; __be16 dport;
    };"""

    C_NAME: ClassVar[str] = "ct_key"
    _fields_ = [
        ("ep_id", ctypes.c_uint32),
        ("egress", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
    ]


class CtEntryStruct(ctypes.Structure):
    """struct ct_entry {
        __u64 expires_ns; __u64 packets; __u64 bytes; __u32 flags; __u32 verdict_gen;
    };"""

    C_NAME: ClassVar[str] = "ct_entry"
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("verdict_gen", ctypes.c_uint32),
    ]


class DpConfigStruct(ctypes.Structure):
    """struct dp_config {
        __u64 ct_tcp_ns; __u64 ct_syn_ns; __u64 ct_non_tcp_ns; __u64 ct_closing_ns;
        __u32 flags; __u32 generation;
    };"""

    C_NAME: ClassVar[str] = "dp_config"
    _fields_ = [
        ("ct_tcp_ns", ctypes.c_uint64),
        ("ct_syn_ns", ctypes.c_uint64),
        ("ct_non_tcp_ns", ctypes.c_uint64),
        ("ct_closing_ns", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("generation", ctypes.c_uint32),
    ]


class Frag4KeyStruct(ctypes.Structure):
    """struct frag4_key {
        __u32 ep_id; __u8 egress; __u8 proto; __be16 ip_id; __be32 saddr; __be32 daddr;
    };"""

    C_NAME: ClassVar[str] = "frag4_key"
    _fields_ = [
        ("ep_id", ctypes.c_uint32),
        ("egress", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("ip_id", ctypes.c_uint16),
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
    ]


class Frag6KeyStruct(ctypes.Structure):
    """struct frag6_key {
        __u32 ep_id; __u8 egress; __u8 proto; __u16 pad; __be32 frag_id;
        __u8 saddr[16]; __u8 daddr[16];
    };"""

    C_NAME: ClassVar[str] = "frag6_key"
    _fields_ = [
        ("ep_id", ctypes.c_uint32),
        ("egress", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
        ("frag_id", ctypes.c_uint32),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
    ]


class Frag4PortsStruct(ctypes.Structure):
    """struct frag4_ports { __be16 sport; __be16 dport; };"""

    C_NAME: ClassVar[str] = "frag4_ports"
    _fields_ = [("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16)]


class MetricsKeyStruct(ctypes.Structure):
    """struct metrics_key { __u8 reason; __u8 dir; __u16 pad; };"""

    C_NAME: ClassVar[str] = "metrics_key"
    _fields_ = [("reason", ctypes.c_uint8), ("dir", ctypes.c_uint8), ("pad", ctypes.c_uint16)]


class MetricsValueStruct(ctypes.Structure):
    """struct metrics_value { __u64 packets; __u64 bytes; };"""

    C_NAME: ClassVar[str] = "metrics_value"
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


LAYOUTS: tuple[type[ctypes.Structure], ...] = (
    EndpointInfoStruct,
    PolicyKeyStruct,
    PolicyEntryStruct,
    Ipcache4KeyStruct,
    Ipcache6KeyStruct,
    RemoteInfoStruct,
    CtKeyStruct,
    CtEntryStruct,
    DpConfigStruct,
    Frag4KeyStruct,
    Frag6KeyStruct,
    Frag4PortsStruct,
    MetricsKeyStruct,
    MetricsValueStruct,
)
"""Every mirrored struct of ``bpf/flagella.h`` except ``struct event`` (in events.py)."""

_S = TypeVar("_S", bound=ctypes.Structure)


def _pack(s: ctypes.Structure) -> bytes:
    return bytes(s)


def _unpack(cls: type[_S], raw: bytes) -> _S:
    return cls.from_buffer_copy(raw[: ctypes.sizeof(cls)])


def _be16(port: int) -> int:
    """A host-order 16-bit value as the native integer whose memory is network order."""
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def _from_be16(raw: int) -> int:
    return int.from_bytes(raw.to_bytes(2, sys.byteorder), "big")


def _be32(addr: ipaddress.IPv4Address) -> int:
    return int.from_bytes(addr.packed, sys.byteorder)


def _from_be32(raw: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(raw.to_bytes(4, sys.byteorder))


def _addr16(addr: IPAddress) -> bytes:
    """16-byte form: IPv6 as is, IPv4 IPv4-mapped."""
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def _from_addr16(raw: bytes) -> IPAddress:
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return ipaddress.IPv4Address(raw[12:16])
    return ipaddress.IPv6Address(bytes(raw[:16]))


# --------------------------------------------------------------------------------------------
# Map specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapSpec:
    """One pinned map: what ``bpf/flagella.c`` declares for it."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0

    def with_max_entries(self, n: int) -> MapSpec:
        return MapSpec(self.name, self.type, self.key_size, self.value_size, n, self.flags)


def _spec(
    name: str,
    type_: int,
    key: type[ctypes.c_uint32] | type[ctypes.Structure] | None,
    value: type[ctypes.Structure] | None,
    max_entries: int,
    flags: int = 0,
) -> MapSpec:
    return MapSpec(
        name,
        type_,
        0 if key is None else ctypes.sizeof(key),
        0 if value is None else ctypes.sizeof(value),
        max_entries,
        flags,
    )


MAP_SPECS: Mapping[str, MapSpec] = {
    s.name: s
    for s in (
        _spec(
            "endpoints", MapType.HASH, ctypes.c_uint32, EndpointInfoStruct, 65536, BPF_F_NO_PREALLOC
        ),
        _spec(
            "policy", MapType.HASH, PolicyKeyStruct, PolicyEntryStruct, 262144, BPF_F_NO_PREALLOC
        ),
        _spec(
            "ipcache4",
            MapType.LPM_TRIE,
            Ipcache4KeyStruct,
            RemoteInfoStruct,
            512000,
            BPF_F_NO_PREALLOC,
        ),
        _spec(
            "ipcache6",
            MapType.LPM_TRIE,
            Ipcache6KeyStruct,
            RemoteInfoStruct,
            512000,
            BPF_F_NO_PREALLOC,
        ),
        _spec("ct", MapType.LRU_HASH, CtKeyStruct, CtEntryStruct, 262144, 0),
        _spec("config", MapType.ARRAY, ctypes.c_uint32, DpConfigStruct, 1),
        _spec("frag4", MapType.LRU_HASH, Frag4KeyStruct, Frag4PortsStruct, 8192, 0),
        _spec("frag6", MapType.LRU_HASH, Frag6KeyStruct, Frag4PortsStruct, 8192, 0),
        _spec("metrics", MapType.PERCPU_HASH, MetricsKeyStruct, MetricsValueStruct, 1024, 0),
        _spec("forwarded", MapType.PERCPU_ARRAY, ctypes.c_uint32, MetricsValueStruct, 4, 0),
        _spec("events", MapType.RINGBUF, None, None, 64 * 4096, 0),
    )
}
"""The state maps pinned under the pin directory, with their default sizes."""

_PERCPU_TYPES = {MapType.PERCPU_HASH, MapType.PERCPU_ARRAY}
_ARRAY_TYPES = {MapType.ARRAY, MapType.PERCPU_ARRAY}
_BATCH_TYPES = {MapType.HASH, MapType.LRU_HASH, MapType.PERCPU_HASH, MapType.ARRAY}


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


@runtime_checkable
class MapBackend(Protocol):
    """One map, bytes in and bytes out, with the kernel's semantics.

    ``value_size`` is the size of one CPU's value; a per-CPU map (``cpus`` > 1) takes and
    returns ``cpus`` slots of ``value_size`` rounded up to 8 bytes. Errors are
    :class:`~flagella.datapath._bpfsys.BpfError` with the kernel's errno.
    """

    @property
    def key_size(self) -> int: ...

    @property
    def value_size(self) -> int: ...

    @property
    def cpus(self) -> int: ...

    def lookup(self, key: bytes) -> bytes | None: ...

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None: ...

    def delete(self, key: bytes) -> bool: ...

    def keys(self) -> Iterator[bytes]: ...

    def items(self) -> list[tuple[bytes, bytes]]: ...

    def update_many(self, pairs: Iterable[tuple[bytes, bytes]]) -> int: ...

    def delete_many(self, keys: Iterable[bytes]) -> int: ...

    def close(self) -> None: ...


def _slot(value_size: int) -> int:
    return (value_size + 7) & ~7


class KernelMap:
    """A BPF map reached through bpf(2), usually opened from its pin."""

    def __init__(self, fd: int, name: str = "") -> None:
        self._fd = fd
        info = _bpfsys.map_info(fd)
        self.info = info
        self.name = name or info.name
        self._cpus = _bpfsys.possible_cpus() if info.type in _PERCPU_TYPES else 1
        self._batch = info.type in _BATCH_TYPES

    @classmethod
    def open_pinned(cls, path: str | Path, expect: MapSpec | None = None) -> KernelMap:
        """Open the map pinned at ``path``; with ``expect``, refuse one of another layout."""
        fd = _bpfsys.obj_get(str(path))
        m = cls(fd, Path(path).name)
        if expect is not None:
            try:
                check_compatible(m.info, expect, str(path))
            except DatapathError:
                m.close()
                raise
        return m

    @classmethod
    def create(cls, spec: MapSpec) -> KernelMap:
        """A new unpinned map of ``spec`` (tests, scratch)."""
        fd = _bpfsys.map_create(
            spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, spec.name
        )
        return cls(fd, spec.name)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def key_size(self) -> int:
        return self.info.key_size

    @property
    def value_size(self) -> int:
        return self.info.value_size

    @property
    def cpus(self) -> int:
        return self._cpus

    def _full_value_size(self) -> int:
        return self.value_size if self._cpus == 1 else _slot(self.value_size) * self._cpus

    def lookup(self, key: bytes) -> bytes | None:
        return _bpfsys.map_lookup(self._fd, key, self._full_value_size())

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        _bpfsys.map_update(self._fd, key, value, flags)

    def delete(self, key: bytes) -> bool:
        return _bpfsys.map_delete(self._fd, key)

    def keys(self) -> Iterator[bytes]:
        key = _bpfsys.map_get_next_key(self._fd, None, self.key_size)
        while key is not None:
            yield key
            key = _bpfsys.map_get_next_key(self._fd, key, self.key_size)

    def items(self) -> list[tuple[bytes, bytes]]:
        if self._batch:
            try:
                return _bpfsys.map_lookup_batch(self._fd, self.key_size, self._full_value_size())
            except BpfError:
                self._batch = False  # kernel without batch ops for this type
        out = []
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:  # deleted meanwhile
                out.append((k, v))
        return out

    def update_many(self, pairs: Iterable[tuple[bytes, bytes]]) -> int:
        pairs = list(pairs)
        if not pairs:
            return 0
        if self._batch:
            try:
                return _bpfsys.map_update_batch(
                    self._fd,
                    b"".join(k for k, _ in pairs),
                    b"".join(v for _, v in pairs),
                    len(pairs),
                )
            except BpfError as e:
                if e.errno not in (22, 95, 524):  # EINVAL, EOPNOTSUPP, ENOTSUPP
                    raise
                self._batch = False
        for k, v in pairs:
            self.update(k, v)
        return len(pairs)

    def delete_many(self, keys: Iterable[bytes]) -> int:
        return sum(1 for k in keys if self.delete(k))

    def close(self) -> None:
        if self._fd >= 0:
            _bpfsys.close(self._fd)
            self._fd = -1

    def __enter__(self) -> KernelMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_compatible(info: _bpfsys.MapInfo, spec: MapSpec, where: str) -> None:
    """Raise DatapathError if a pinned map does not have the layout ``spec`` describes."""
    problems = []
    for what, have, want in (
        ("type", info.type, spec.type),
        ("key size", info.key_size, spec.key_size),
        ("value size", info.value_size, spec.value_size),
        ("max entries", info.max_entries, spec.max_entries),
        ("flags", info.map_flags, spec.flags),
    ):
        if have != want:
            problems.append(f"{what} {have} (expected {want})")
    if problems:
        raise DatapathError(
            f"pinned map {where} has another layout: {', '.join(problems)}; "
            "remove it to let the datapath recreate it (its state is lost)"
        )


class DictMap:
    """In-memory twin of a BPF map of ``spec``'s type, errno for errno.

    HASH and PERCPU_HASH refuse a new key when full (E2BIG); LRU_HASH evicts the least
    recently updated entry (the kernel also counts the program's lookups, which user space
    cannot see); ARRAY has every index from the start and cannot delete (EINVAL);
    LPM_TRIE looks up the longest stored prefix (keys are ``u32 prefixlen`` + address).
    """

    def __init__(self, spec: MapSpec, cpus: int = 1) -> None:
        self.spec = spec
        self.name = spec.name
        self._cpus = cpus if spec.type in _PERCPU_TYPES else 1
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        if spec.type in _ARRAY_TYPES:
            zero = bytes(self._full_value_size())
            for i in range(spec.max_entries):
                self._data[i.to_bytes(4, sys.byteorder)] = zero

    @property
    def key_size(self) -> int:
        return self.spec.key_size

    @property
    def value_size(self) -> int:
        return self.spec.value_size

    @property
    def cpus(self) -> int:
        return self._cpus

    def _full_value_size(self) -> int:
        return self.value_size if self._cpus == 1 else _slot(self.value_size) * self._cpus

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise BpfError(f"{self.name}: key of {len(key)} bytes", 22)

    def lookup(self, key: bytes) -> bytes | None:
        self._check_key(key)
        if self.spec.type == MapType.LPM_TRIE:
            return self._lpm_lookup(key)
        return self._data.get(key)  # like bpf(2) lookups, this does not refresh LRU order

    def _lpm_lookup(self, key: bytes) -> bytes | None:
        plen = int.from_bytes(key[:4], sys.byteorder)
        addr = int.from_bytes(key[4:], "big")
        width = (len(key) - 4) * 8
        for n in range(min(plen, width), -1, -1):
            masked = addr & ~((1 << (width - n)) - 1) if n else 0
            k = n.to_bytes(4, sys.byteorder) + masked.to_bytes(width // 8, "big")
            v = self._data.get(k)
            if v is not None:
                return v
        return None

    def _lpm_normal(self, key: bytes) -> bytes:
        # The kernel matches only the first prefixlen bits; store the key with the rest zeroed.
        plen = int.from_bytes(key[:4], sys.byteorder)
        width = (len(key) - 4) * 8
        if plen > width:
            raise BpfError(f"{self.name}: prefixlen {plen}", 22)
        addr = int.from_bytes(key[4:], "big")
        masked = addr & ~((1 << (width - plen)) - 1) if plen else 0
        return key[:4] + masked.to_bytes(width // 8, "big")

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._check_key(key)
        if len(value) != self._full_value_size():
            raise BpfError(f"{self.name}: value of {len(value)} bytes", 22)
        if self.spec.type == MapType.LPM_TRIE:
            key = self._lpm_normal(key)
        exists = key in self._data
        if self.spec.type in _ARRAY_TYPES:
            if not exists:
                raise BpfError(f"{self.name}: index out of range", 7)  # E2BIG
            if flags == BPF_NOEXIST:
                raise BpfError(f"{self.name}: update", 17)  # EEXIST
        elif flags == BPF_NOEXIST and exists:
            raise BpfError(f"{self.name}: update", 17)
        elif flags == BPF_EXIST and not exists:
            raise BpfError(f"{self.name}: update", 2)  # ENOENT
        if not exists and len(self._data) >= self.spec.max_entries:
            if self.spec.type == MapType.LRU_HASH:
                self._data.popitem(last=False)
            else:
                raise BpfError(f"{self.name}: map full", 7)  # E2BIG
        self._data[key] = bytes(value)
        if self.spec.type == MapType.LRU_HASH:
            self._data.move_to_end(key)

    def delete(self, key: bytes) -> bool:
        self._check_key(key)
        if self.spec.type in _ARRAY_TYPES:
            raise BpfError(f"{self.name}: delete from array", 22)
        if self.spec.type == MapType.LPM_TRIE:
            key = self._lpm_normal(key)
        return self._data.pop(key, None) is not None

    def keys(self) -> Iterator[bytes]:
        yield from list(self._data)

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self._data.items())

    def update_many(self, pairs: Iterable[tuple[bytes, bytes]]) -> int:
        n = 0
        for k, v in pairs:
            self.update(k, v)
            n += 1
        return n

    def delete_many(self, keys: Iterable[bytes]) -> int:
        return sum(1 for k in keys if self.delete(k))

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Typed values
# --------------------------------------------------------------------------------------------


class Verdict(IntEnum):
    ALLOW = 1
    DENY = 2
    REDIRECT = 3  # to the L7 proxy at proxy_port
    PASS = 4  # ClusterNetworkPolicy Pass: the normal tier decides


class Direction(IntEnum):
    """Metrics and events direction, from the pod's point of view."""

    INGRESS = 1  # to the pod
    EGRESS = 2  # from the pod


class CtFlags(IntFlag):
    SEEN_NON_SYN = 0x1
    CLOSING_FWD = 0x2
    CLOSING_REV = 0x4
    DENIED = 0x8  # tombstone of a flow that policy denies (see flagella.h)


@dataclass(frozen=True)
class EndpointInfo:
    """What the datapath knows of one endpoint, keyed by its host-side ifindex."""

    ep_id: int
    identity: int
    enforce_ingress: bool = False
    enforce_egress: bool = False
    ingress_wild_mask: int = 0
    egress_wild_mask: int = 0
    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None

    def _struct(self) -> EndpointInfoStruct:
        s = EndpointInfoStruct(
            ep_id=self.ep_id,
            identity=self.identity,
            flags=(1 if self.enforce_ingress else 0) | (2 if self.enforce_egress else 0),
            ingress_wild_mask=self.ingress_wild_mask,
            egress_wild_mask=self.egress_wild_mask,
            ipv4=_be32(self.ipv4) if self.ipv4 is not None else 0,
        )
        if self.ipv6 is not None:
            s.ipv6[:] = list(self.ipv6.packed)
        return s

    @classmethod
    def _from(cls, s: EndpointInfoStruct) -> EndpointInfo:
        v6 = bytes(s.ipv6)
        return cls(
            ep_id=s.ep_id,
            identity=s.identity,
            enforce_ingress=bool(s.flags & 1),
            enforce_egress=bool(s.flags & 2),
            ingress_wild_mask=s.ingress_wild_mask,
            egress_wild_mask=s.egress_wild_mask,
            ipv4=_from_be32(s.ipv4) if s.ipv4 else None,
            ipv6=ipaddress.IPv6Address(v6) if any(v6) else None,
        )


@dataclass(frozen=True)
class PolicyKey:
    """One policy map key. ``identity`` 0 is any peer; ``protocol`` 0 is any protocol
    (``wild_bits`` must then be 16). ``port`` is host order with its low ``wild_bits`` bits
    zero; for ICMP/ICMPv6 it is the message type."""

    ep_id: int
    identity: int
    egress: bool
    protocol: int
    port: int = 0
    wild_bits: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.wild_bits <= 16:
            raise ValueError(f"wild_bits {self.wild_bits}: must be 0-16")
        if not 0 <= self.port <= 0xFFFF or self.port & ((1 << self.wild_bits) - 1):
            raise ValueError(f"port {self.port}: low {self.wild_bits} bits must be zero")
        if self.protocol == 0 and (self.wild_bits != 16 or self.port != 0):
            raise ValueError("protocol 0 (any) needs port 0 and wild_bits 16")

    @classmethod
    def any_port(cls, ep_id: int, identity: int, egress: bool, protocol: int = 0) -> PolicyKey:
        return cls(ep_id, identity, egress, protocol, 0, 16)

    def _struct(self) -> PolicyKeyStruct:
        return PolicyKeyStruct(
            ep_id=self.ep_id,
            identity=self.identity,
            egress=int(self.egress),
            protocol=self.protocol,
            wild_bits=self.wild_bits,
            port=self.port,
        )

    @classmethod
    def _from(cls, s: PolicyKeyStruct) -> PolicyKey:
        return cls(s.ep_id, s.identity, bool(s.egress), s.protocol, s.port, s.wild_bits)


@dataclass(frozen=True)
class PolicyValue:
    verdict: Verdict
    proxy_port: int = 0
    packets: int = 0
    bytes: int = 0
    #: 0 normal tier; > 0 admin tier (higher decides first); < 0 baseline tier.
    precedence: int = 0

    def _struct(self) -> PolicyEntryStruct:
        return PolicyEntryStruct(
            verdict=int(self.verdict),
            proxy_port=self.proxy_port,
            precedence=self.precedence,
            packets=self.packets,
            bytes=self.bytes,
        )

    @classmethod
    def _from(cls, s: PolicyEntryStruct) -> PolicyValue:
        return cls(Verdict(s.verdict), s.proxy_port, s.packets, s.bytes, s.precedence)


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
    """The ``config`` map: conntrack lifetimes (Cilium 1.1's) and feature flags."""

    ct_tcp_ns: int = 21600 * NSEC_PER_SEC
    ct_syn_ns: int = 60 * NSEC_PER_SEC
    ct_non_tcp_ns: int = 60 * NSEC_PER_SEC
    ct_closing_ns: int = 10 * NSEC_PER_SEC
    trace_new_flows: bool = False

    def _struct(self) -> DpConfigStruct:
        return DpConfigStruct(
            ct_tcp_ns=self.ct_tcp_ns,
            ct_syn_ns=self.ct_syn_ns,
            ct_non_tcp_ns=self.ct_non_tcp_ns,
            ct_closing_ns=self.ct_closing_ns,
            flags=1 if self.trace_new_flows else 0,
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
    """``endpoints``: host-side veth ifindex -> :class:`EndpointInfo`."""

    @staticmethod
    def _key(ifindex: int) -> bytes:
        return ifindex.to_bytes(4, sys.byteorder)

    def set(self, ifindex: int, info: EndpointInfo) -> None:
        self.backend.update(self._key(ifindex), _pack(info._struct()))

    def get(self, ifindex: int) -> EndpointInfo | None:
        raw = self.backend.lookup(self._key(ifindex))
        return None if raw is None else EndpointInfo._from(_unpack(EndpointInfoStruct, raw))

    def delete(self, ifindex: int) -> bool:
        return self.backend.delete(self._key(ifindex))

    def items(self) -> dict[int, EndpointInfo]:
        return {
            int.from_bytes(k, sys.byteorder): EndpointInfo._from(_unpack(EndpointInfoStruct, v))
            for k, v in self.backend.items()
        }


class PolicyMap(_Typed):
    """``policy``: :class:`PolicyKey` -> :class:`PolicyValue` (verdict, proxy port, counters)."""

    def set(
        self, key: PolicyKey, verdict: Verdict, proxy_port: int = 0, precedence: int = 0
    ) -> None:
        """Write one entry; its counters start at zero."""
        value = PolicyValue(verdict, proxy_port, precedence=precedence)
        self.backend.update(_pack(key._struct()), _pack(value._struct()))

    def set_many(
        self, entries: Mapping[PolicyKey, tuple[Verdict, int] | tuple[Verdict, int, int]]
    ) -> int:
        """Write many entries: (verdict, proxy port[, precedence]) each."""
        return self.backend.update_many(
            (_pack(k._struct()), _pack(PolicyValue(v[0], v[1], precedence=v[2] if len(v) > 2 else 0)._struct()))  # type: ignore[misc]
            for k, v in entries.items()
        )

    def get(self, key: PolicyKey) -> PolicyValue | None:
        raw = self.backend.lookup(_pack(key._struct()))
        return None if raw is None else PolicyValue._from(_unpack(PolicyEntryStruct, raw))

    def delete(self, key: PolicyKey) -> bool:
        return self.backend.delete(_pack(key._struct()))

    def items(self) -> dict[PolicyKey, PolicyValue]:
        return {
            PolicyKey._from(_unpack(PolicyKeyStruct, k)): PolicyValue._from(
                _unpack(PolicyEntryStruct, v)
            )
            for k, v in self.backend.items()
        }

    def entries(self, ep_id: int) -> dict[PolicyKey, PolicyValue]:
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
        stale = [_pack(k._struct()) for k in current if k not in desired]
        return written, self.backend.delete_many(stale)

    def delete_endpoint(self, ep_id: int) -> int:
        return self.backend.delete_many([_pack(k._struct()) for k in self.entries(ep_id)])


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
                key = MetricKey(0, direction)
                old = out.get(key, MetricValue(0, 0))
                out[key] = MetricValue(old.packets + fwd.packets, old.bytes + fwd.bytes)
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
