"""Desired kernel state, computed from resolved policy; and the diff to reach it.

The control plane never edits maps entry by entry from scattered places.
It computes what each map *should* hold (`PolicyEntries`, ipcache and
endpoint rows), and `diff` says what to write and what to delete. The same
diff serves the regeneration of one endpoint and the sync controller that
repairs drift (entries someone added or removed with bpftool).

:func:`identity_entries` computes the entries of one peer identity only: the
realizer recomputes just the identities whose MapState keys changed.

MapState keys become kernel keys here: a port range is split into
power-of-two aligned blocks (`port_blocks`), "any protocol" is protocol 0
with all 16 port bits wildcarded, and two MapState keys that share a block
merge the way MapState merges (deny > pass > redirect > allow).

A value carries its key's precedence (ClusterNetworkPolicy tiers, see
`flagella.policy.mapstate`): 0 for the normal tier, above 0 for Admin, below
0 for Baseline. Two keys of different precedence that share a block keep the
higher precedence only (an Admin key over a normal one, a normal key over a
Baseline one). That is exact unless a Pass of higher precedence, in this
block or another, hands the decision down to a tier whose key was dropped
here; being exact there needs one value per tier in the kernel map.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

from flagella.datapath.entries import PolicyKey, PolicyValue
from flagella.policy.mapstate import (
    ANY_PROTOCOL,
    PORT_MAX,
    Entry,
    Key,
    MapState,
    Verdict,
    port_blocks,
)


def _merge(a: PolicyValue, b: PolicyValue) -> PolicyValue:
    if a.precedence != b.precedence:
        return a if a.precedence > b.precedence else b
    rank = {Verdict.DENY: 4, Verdict.PASS: 3, Verdict.REDIRECT: 2, Verdict.ALLOW: 1}
    return a if rank[Verdict(a.verdict)] >= rank[Verdict(b.verdict)] else b


def policy_entries(
    ep_id: int, state: MapState, egress: bool, proxy_port: int
) -> tuple[dict[PolicyKey, PolicyValue], int]:
    """Kernel policy entries of one endpoint and direction, and the wild-bits mask."""
    out = _entries(ep_id, state, egress, proxy_port)
    mask = 0
    for bits in {k.wild_bits for k in out}:
        mask |= 1 << bits
    return out, mask


def identity_entries(
    ep_id: int, state: MapState, identity: int, egress: bool, proxy_port: int
) -> dict[PolicyKey, PolicyValue]:
    """The kernel entries of one peer identity: the part of :func:`policy_entries` that
    the MapState keys of ``identity`` make (entries of two identities never merge)."""
    entries = state.entries
    return _entries(ep_id, ((k, entries[k]) for k in state.keys_of(identity)), egress, proxy_port)


def wild_mask(widths: Mapping[int, int]) -> int:
    """The endpoint row's mask of block widths, from a count of entries per width."""
    mask = 0
    for bits, n in widths.items():
        if n > 0:
            mask |= 1 << bits
    return mask


def _entries(
    ep_id: int, keys: Iterable[tuple[Key, Entry]], egress: bool, proxy_port: int
) -> dict[PolicyKey, PolicyValue]:
    out: dict[PolicyKey, PolicyValue] = {}
    for key, entry in keys:
        value = _value(entry, proxy_port, key.precedence)
        if key.protocol == ANY_PROTOCOL or (key.port == 0 and key.end_port == PORT_MAX):
            blocks = [(0, 16)]
        else:
            blocks = port_blocks(key.port, key.end_port)
        for base, bits in blocks:
            k = PolicyKey(ep_id, key.identity, egress, key.protocol, base, bits)
            old = out.get(k)
            out[k] = value if old is None else _merge(old, value)
    return out


def _value(entry: Entry, proxy_port: int, precedence: int = 0) -> PolicyValue:
    if entry.verdict == Verdict.REDIRECT:
        return _interned(Verdict.REDIRECT, proxy_port, precedence)
    return _interned(entry.verdict, 0, precedence)


@functools.lru_cache(maxsize=4096)
def _interned(verdict: Verdict, proxy_port: int, precedence: int) -> PolicyValue:
    """One object per distinct value: half a million entries share a handful of values."""
    return PolicyValue(verdict, proxy_port, precedence)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def diff(
    actual: Mapping[K, V], desired: Mapping[K, V], scope: Iterable[K] | None = None
) -> tuple[dict[K, V], list[K]]:
    """(entries to write, keys to delete) to turn ``actual`` into ``desired``.

    With ``scope``, only keys in it are considered for deletion (used to
    regenerate one endpoint without touching the others' entries).
    """
    upserts = {k: v for k, v in desired.items() if actual.get(k) != v}
    keys = actual.keys() if scope is None else scope
    deletes = [k for k in keys if k in actual and k not in desired]
    return upserts, deletes
