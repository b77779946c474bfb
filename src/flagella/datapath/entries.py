"""The kernel's vocabulary in plain Python: one class per map row the agent writes.

Pure (no ctypes, no I/O): the control plane computes these (`flagella.datapath.desired`),
the realizer diffs them (`flagella.datapath.realizer`), and the typed map wrappers
(`flagella.datapath.maps`) turn them into the byte layouts of `flagella.datapath.layouts`.

* :class:`PolicyKey` mirrors ``struct policy_key``;
* :class:`PolicyValue` is the configuration half of ``struct policy_entry`` (what the
  agent writes and compares); :class:`PolicyEntry` is the whole entry as read back,
  counters included;
* :class:`EndpointRow` mirrors ``struct endpoint_info`` (the ``endpoints`` map's value).

Verdicts and directions are `flagella.policy`'s :class:`Verdict` and :class:`Direction`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from flagella.policy.mapstate import Direction, Verdict

__all__ = ["Direction", "EndpointRow", "PolicyEntry", "PolicyKey", "PolicyValue", "Verdict"]


@dataclass(frozen=True, order=True)
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

    @property
    def direction(self) -> Direction:
        return Direction.EGRESS if self.egress else Direction.INGRESS


@dataclass(frozen=True)
class PolicyValue:
    """What a policy entry says: the verdict, the proxy port of a redirect, and the
    MapState key's precedence (0 normal tier, > 0 Admin, < 0 Baseline; higher first)."""

    verdict: Verdict
    proxy_port: int = 0
    precedence: int = 0


@dataclass(frozen=True)
class PolicyEntry:
    """A policy entry as read back from the map: its value and its counters."""

    verdict: Verdict
    proxy_port: int = 0
    packets: int = 0
    bytes: int = 0
    precedence: int = 0

    @property
    def value(self) -> PolicyValue:
        return PolicyValue(self.verdict, self.proxy_port, self.precedence)


@dataclass(frozen=True)
class EndpointRow:
    """What the datapath knows of one endpoint, keyed by its host-side ifindex."""

    ep_id: int
    identity: int
    enforce_ingress: bool = False
    enforce_egress: bool = False
    ingress_wild_mask: int = 0
    egress_wild_mask: int = 0
    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None
