"""Pod address allocation (IPAM): the one implementation, pure.

`PodAddressAllocator` hands out addresses from one node CIDR given the addresses
in use. The agent holds one per address family; a requested address is checked
against the CIDR and the addresses taken, with an error that names what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Generic, TypeVar, cast, overload

from flagella.errors import InputError

__all__ = ["PodAddressAllocator", "PodCIDRExhausted"]

IPAddress = IPv4Address | IPv6Address

# -- IPAM ------------------------------------------------------------------------------------

_Addr = TypeVar("_Addr", IPv4Address, IPv6Address)


class PodCIDRExhausted(InputError):
    """Every usable address of a node's pod CIDR is in use."""


class PodAddressAllocator(Generic[_Addr]):
    """Hands out pod addresses from one node CIDR, given the addresses already in use.

    The network address, the one after it (``.1``, kept for a gateway) and the last
    address (IPv4 broadcast; reserved in IPv6 too, for symmetry) are never handed out.
    Allocation scans forward from the last address handed out, so a just-released address
    is reused only after the rest of the range: stale ipcache and conntrack entries for it
    have time to age out. Pure: no I/O.
    """

    @overload
    def __init__(
        self: PodAddressAllocator[IPv4Address],
        cidr: IPv4Network,
        in_use: Iterable[IPv4Address] = (),
    ) -> None: ...

    @overload
    def __init__(
        self: PodAddressAllocator[IPv6Address],
        cidr: IPv6Network,
        in_use: Iterable[IPv6Address] = (),
    ) -> None: ...

    def __init__(self, cidr: IPv4Network | IPv6Network, in_use: Iterable[IPAddress] = ()) -> None:
        if cidr.num_addresses < 4:
            raise InputError(f"pod CIDR {cidr}: too small, needs at least 4 addresses")
        self.cidr = cidr
        self._first = int(cidr.network_address) + 2
        self._last = int(cidr.broadcast_address) - 1
        self._cursor = self._first
        self._in_use: set[_Addr] = set()
        for address in in_use:
            self._in_use.add(self._check(address))

    @property
    def in_use(self) -> frozenset[_Addr]:
        return frozenset(self._in_use)

    @property
    def capacity(self) -> int:
        return self._last - self._first + 1

    def allocate(self, requested: _Addr | None = None) -> _Addr:
        """Reserve ``requested`` if given and free, else the next free address."""
        if requested is not None:
            address = self._check(requested)
            if address in self._in_use:
                raise InputError(f"address {address} is already in use in {self.cidr}")
            self._in_use.add(address)
            return address
        if len(self._in_use) >= self.capacity:
            raise PodCIDRExhausted(f"pod CIDR {self.cidr}: all {self.capacity} addresses in use")
        span = self.capacity
        for step in range(span):
            value = self._first + (self._cursor - self._first + step) % span
            candidate: _Addr = self._make(value)
            if candidate not in self._in_use:
                self._in_use.add(candidate)
                self._cursor = self._first + (value - self._first + 1) % span
                return candidate
        raise PodCIDRExhausted(f"pod CIDR {self.cidr}: all {self.capacity} addresses in use")

    def release(self, address: _Addr) -> None:
        """Return ``address`` to the pool (no-op when it was not in use)."""
        self._in_use.discard(address)

    def _make(self, value: int) -> _Addr:
        return cast(_Addr, self.cidr.network_address.__class__(value))

    def _check(self, address: IPAddress) -> _Addr:
        if address.version != self.cidr.version or address not in self.cidr:
            raise InputError(f"address {address} is not in pod CIDR {self.cidr}")
        if not self._first <= int(address) <= self._last:
            raise InputError(
                f"address {address} is reserved in pod CIDR {self.cidr} "
                "(network, gateway .1 or last address)"
            )
        return cast(_Addr, address)  # same version as the CIDR, checked above
