"""Drop and trace events from the datapath's ring buffer.

Theory of operation
-------------------
``bpf/flagella.c`` writes a ``struct event`` into the pinned ``events``
BPF_MAP_TYPE_RINGBUF for every drop and, when ``DatapathConfig.trace_new_flows``
is on, for every new flow that passes. :class:`RingBufferReader` consumes the
ring directly (mmap of the consumer page read-write, the producer page and the
twice-mapped data area read-only, as libbpf does), so events can be read by
any process that can open the pin: no bcc and no compile. :func:`decode_event`
turns the bytes into a :class:`DatapathEvent`; it is pure and unit-tested
without a kernel. :class:`EventReader` joins the two.

Drop reasons are Cilium's ``DROP_*`` numbers, positive, with the 1.1 monitor
strings (:data:`DROP_REASONS`).
"""

from __future__ import annotations

import ctypes
import ipaddress
import mmap
import os
import select
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import ClassVar

from flagella.datapath import _bpfsys
from flagella.errors import DatapathError

__all__ = [
    "DROP_REASONS",
    "CtState",
    "DatapathEvent",
    "DropReason",
    "EventReader",
    "EventStruct",
    "EventType",
    "RingBufferReader",
    "decode_event",
    "reason_text",
]


class DropReason(IntEnum):
    """The drop reasons the datapath emits (Cilium's numbers, positive)."""

    INVALID_SOURCE_IP = 132
    POLICY_DENIED = 133
    INVALID_PACKET = 134
    MISSED_TAIL_CALL = 140
    INVALID_IPV6_EXT = 156
    FRAG_NOSUPPORT = 157
    UNSUPPORTED_L2 = 166  # Cilium's DROP_UNSUPPORTED_L2: VLAN-tagged or non-IP/ARP frames
    FRAG_NOT_FOUND = 175  # Cilium's DROP_FRAG_NOT_FOUND; 160 is DROP_NO_TUNNEL_ENDPOINT


DROP_REASONS: dict[int, str] = {
    130: "Invalid source mac",
    131: "Invalid destination mac",
    132: "Invalid source ip",
    133: "Policy denied (L3)",
    134: "Invalid packet",
    135: "CT: Truncated or invalid header",
    136: "CT: Missing TCP ACK flag",
    137: "CT: Unknown L4 protocol",
    138: "CT: Can't create entry from packet",
    139: "Unsupported L3 protocol",
    140: "Missed tail call",
    141: "Error writing to packet",
    142: "Unknown L4 protocol",
    143: "Unknown ICMPv4 code",
    144: "Unknown ICMPv4 type",
    145: "Unknown ICMPv6 code",
    146: "Unknown ICMPv6 type",
    147: "Error retrieving tunnel key",
    148: "Error retrieving tunnel options",
    149: "Invalid Geneve option",
    150: "Unknown L3 target address",
    151: "Not a local target address",
    152: "No matching local container found",
    153: "Error while correcting L3 checksum",
    154: "Error while correcting L4 checksum",
    155: "CT: Map insertion failed",
    156: "Invalid IPv6 extension header",
    157: "IPv6 fragmentation not supported",
    158: "Service backend not found",
    159: "Policy denied (L4)",
    160: "No tunnel/encapsulation endpoint (datapath BUG!)",
    161: "Failed to insert into proxymap",
    162: "Policy denied (CIDR)",
    166: "Unsupported L2 protocol",
    175: "First logical datagram fragment not found",
}
"""Reason number -> Cilium's monitor string (1.1 wording; 175 from later releases)."""


def reason_text(reason: int) -> str:
    if reason == 0:
        return "Forwarded"
    return DROP_REASONS.get(reason, f"Unknown reason {reason}")


class EventType(IntEnum):
    DROP = 1
    TRACE = 2


class CtState(IntEnum):
    NEW = 0
    ESTABLISHED = 1
    REPLY = 2
    RELATED = 3


class EventStruct(ctypes.Structure):
    """struct event {
        __u8 type; __u8 reason; __u8 dir; __u8 family; __u8 proto; __u8 ct_state; __u16 pad;
        __u32 ep_id; __u32 src_identity; __u32 dst_identity;
        __u8 saddr[16]; __u8 daddr[16];
        __be16 sport; __be16 dport; __u32 len;
    };"""

    C_NAME: ClassVar[str] = "event"
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("ct_state", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
        ("ep_id", ctypes.c_uint32),
        ("src_identity", ctypes.c_uint32),
        ("dst_identity", ctypes.c_uint32),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("len", ctypes.c_uint32),
    ]


_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}


@dataclass(frozen=True)
class DatapathEvent:
    type: EventType
    reason: int  # 0 for trace events
    direction: int  # 1 ingress (to the pod), 2 egress (from the pod)
    family: int  # 4, 6, or 0 when the packet was not parsed that far
    proto: int
    ct_state: CtState
    ep_id: int
    src_identity: int
    dst_identity: int
    saddr: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    daddr: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    sport: int  # host order; ICMP echo: the echo id, other ICMP: the type
    dport: int
    length: int

    @property
    def reason_text(self) -> str:
        return reason_text(self.reason)

    def __str__(self) -> str:
        proto = _PROTO_NAMES.get(self.proto, str(self.proto))
        tuple_ = f"{self.saddr}:{self.sport} -> {self.daddr}:{self.dport} {proto}"
        ids = f"identity {self.src_identity}->{self.dst_identity}"
        if self.type == EventType.DROP:
            return f"xx drop ({self.reason_text}) to endpoint {self.ep_id}, {ids}: {tuple_}"
        state = self.ct_state.name.lower()
        arrow = "->" if self.direction == 1 else "<-"
        return f"{arrow} endpoint {self.ep_id} {ids} state {state}: {tuple_}"


def _addr(raw: bytes, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if family == 4:
        return ipaddress.IPv4Address(raw[12:16])
    if family == 6:
        return ipaddress.IPv6Address(raw)
    return None


def _port(be16: int) -> int:
    return int.from_bytes(be16.to_bytes(2, sys.byteorder), "big")


def decode_event(raw: bytes) -> DatapathEvent:
    """Decode one ring-buffer record (``struct event``)."""
    if len(raw) < ctypes.sizeof(EventStruct):
        raise DatapathError(
            f"event record of {len(raw)} bytes, expected {ctypes.sizeof(EventStruct)}"
        )
    s = EventStruct.from_buffer_copy(raw[: ctypes.sizeof(EventStruct)])
    return DatapathEvent(
        type=EventType(s.type),
        reason=s.reason,
        direction=s.dir,
        family=s.family,
        proto=s.proto,
        ct_state=CtState(s.ct_state),
        ep_id=s.ep_id,
        src_identity=s.src_identity,
        dst_identity=s.dst_identity,
        saddr=_addr(bytes(s.saddr), s.family),
        daddr=_addr(bytes(s.daddr), s.family),
        sport=_port(s.sport),
        dport=_port(s.dport),
        length=s.len,
    )


_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class RingBufferReader:
    """Consumer side of a BPF ring buffer map (one reader at a time)."""

    def __init__(self, fd: int) -> None:
        info = _bpfsys.map_info(fd)
        if info.type != _bpfsys.MapType.RINGBUF:
            raise DatapathError(f"map {info.name} is not a ring buffer (type {info.type})")
        self._fd = fd
        self._size = info.max_entries
        self._mask = self._size - 1
        page = mmap.PAGESIZE
        try:
            self._consumer = mmap.mmap(
                fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
            )
            self._data = mmap.mmap(
                fd, page + 2 * self._size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except OSError as e:
            raise DatapathError(f"mmap of ring buffer {info.name}: {e}") from e
        self._page = page
        self._poll = select.epoll()
        self._poll.register(fd, select.EPOLLIN)

    @classmethod
    def open_pinned(cls, path: str | Path) -> RingBufferReader:
        fd = _bpfsys.obj_get(str(path))
        try:
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def read(self) -> list[bytes]:
        """Every record available now (non-blocking)."""
        out = []
        cons = struct.unpack_from("=Q", self._consumer, 0)[0]
        while True:
            prod = struct.unpack_from("=Q", self._data, 0)[0]
            if cons >= prod:
                break
            off = self._page + (cons & self._mask)
            length = struct.unpack_from("=I", self._data, off)[0]
            if length & _BUSY:
                break  # the producer is still writing this record
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                out.append(bytes(self._data[off + _HDR : off + _HDR + size]))
            cons += (size + _HDR + 7) & ~7
            struct.pack_into("=Q", self._consumer, 0, cons)
        return out

    def poll(self, timeout: float) -> list[bytes]:
        """Records available now, or the first ones to arrive within ``timeout`` seconds."""
        records = self.read()
        if records or timeout <= 0:
            return records
        self._poll.poll(timeout)
        return self.read()

    def close(self) -> None:
        if self._fd >= 0:
            self._poll.close()
            self._consumer.close()
            self._data.close()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RingBufferReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventReader:
    """Typed events from the pinned ``events`` ring buffer."""

    def __init__(self, ring: RingBufferReader) -> None:
        self.ring = ring

    @classmethod
    def open_pinned(cls, pin_dir: str | Path) -> EventReader:
        return cls(RingBufferReader.open_pinned(Path(pin_dir) / "events"))

    def read(self) -> list[DatapathEvent]:
        return [decode_event(r) for r in self.ring.read()]

    def poll(self, timeout: float) -> list[DatapathEvent]:
        return [decode_event(r) for r in self.ring.poll(timeout)]

    def wait_for(
        self,
        match: Callable[[DatapathEvent], bool],
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> tuple[DatapathEvent | None, list[DatapathEvent]]:
        """Read until an event satisfies ``match`` or ``timeout`` passes.

        Returns (the matching event or None, every event read meanwhile).
        """
        seen: list[DatapathEvent] = []
        deadline = clock() + timeout
        while True:
            for ev in self.poll(max(0.0, deadline - clock())):
                seen.append(ev)
                if match(ev):
                    return ev, seen
            if clock() >= deadline:
                return None, seen

    def close(self) -> None:
        self.ring.close()
