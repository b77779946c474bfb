"""IP/CIDR -> identity: what the kernel's LPM ipcache should hold.

Three sources feed it, most specific winning by longest-prefix match in the
kernel: every local endpoint address (a /32 or /128 to the endpoint's
identity), every host address (identity 1, host), and every CIDR a policy
names (its CIDR identity). Anything else resolves to world (2) in the
kernel, without an entry. Pure: the agent writes the result to the map.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOST_IDENTITY = 1


def desired_ipcache(
    cidr_identities: Mapping[IPNetwork, int],
    host_addresses: Iterable[IPAddress],
    endpoint_addresses: Iterable[tuple[IPAddress, int]],
) -> dict[IPNetwork, int]:
    """The full ipcache; endpoint addresses override host ones, which override CIDRs."""
    out: dict[IPNetwork, int] = dict(cidr_identities)
    for addr in host_addresses:
        out[ipaddress.ip_network(addr)] = HOST_IDENTITY
    for addr, identity in endpoint_addresses:
        out[ipaddress.ip_network(addr)] = identity
    return out


__all__ = ["HOST_IDENTITY", "desired_ipcache"]
