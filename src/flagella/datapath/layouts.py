"""BPF map layouts: one ctypes ``Structure`` per C struct of ``bpf/flagella.h``.

The first of the three layers of `flagella.datapath.maps`. Each structure
quotes the declaration it mirrors; ``tests/datapath/test_bpf_layout.py``
compiles the header with bcc and compares every size and offset, so the two
cannot drift silently. :data:`MAP_SPECS` names each pinned map with its type,
key, value, flags and default size; the loader compiles the program with those
sizes and refuses pinned maps that disagree. The byte-order helpers live here
too: ``__be16``/``__be32`` fields hold network-order values in native memory,
and IPv4 addresses inside 16-byte fields are stored IPv4-mapped.
"""

from __future__ import annotations

import ctypes
import ipaddress
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from flagella.datapath._bpfsys import MapType

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BPF_F_NO_PREALLOC = 1
IDENTITY_WORLD = 2
NSEC_PER_SEC = 1_000_000_000




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
        __u32 reentry_ifindex; __u8 reentry_mac[6]; __u16 pad;
    };"""

    C_NAME: ClassVar[str] = "dp_config"
    _fields_ = [
        ("ct_tcp_ns", ctypes.c_uint64),
        ("ct_syn_ns", ctypes.c_uint64),
        ("ct_non_tcp_ns", ctypes.c_uint64),
        ("ct_closing_ns", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("generation", ctypes.c_uint32),
        ("reentry_ifindex", ctypes.c_uint32),
        ("reentry_mac", ctypes.c_uint8 * 6),
        ("pad", ctypes.c_uint16),
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
