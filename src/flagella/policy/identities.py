"""Reserved identities and CIDR identity labels: the identities policy itself names.

Reserved identities (``reserved:host``, ``reserved:world``, ...) have fixed
numbers (DESIGN.md). Every prefix a rule names (``toCIDR``, ``ipBlock`` and its
excepts) gets a CIDR identity whose labels are ``cidr:<supernet>`` for every
prefix length up to its own, plus ``reserved:world``, so a rule on a shorter
prefix selects the identities of the longer prefixes inside it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from flagella.policy.api import Policy
from flagella.policy.labels import Label, LabelSet

__all__ = [
    "MIN_ALLOCATED_ID",
    "RESERVED_IDENTITIES",
    "cidr_identity_labels",
    "reserved_identity_labels",
    "rule_prefixes",
]

#: Reserved identities (DESIGN.md).
RESERVED_IDENTITIES: Mapping[str, int] = {
    "host": 1,
    "world": 2,
    "unmanaged": 3,
    "health": 4,
    "init": 5,
    "remote-node": 6,
    "kube-apiserver": 7,
    "ingress": 8,
}
MIN_ALLOCATED_ID = 256


def reserved_identity_labels() -> dict[int, LabelSet]:
    return {i: frozenset({Label("reserved", name)}) for name, i in RESERVED_IDENTITIES.items()}


def cidr_identity_labels(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> LabelSet:
    """``cidr:<prefix>`` for every prefix length up to the network's, plus world."""
    labels = {Label("reserved", "world")}
    for plen in range(network.prefixlen + 1):
        labels.add(Label("cidr", str(network.supernet(new_prefix=plen))))
    return frozenset(labels)


def rule_prefixes(policies: Iterable[Policy]) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Every CIDR (and except) that rules name: each gets a CIDR identity."""
    out: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    for p in policies:
        out |= p.cidr_prefixes
    return out


