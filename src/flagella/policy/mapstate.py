"""MapState: an endpoint's resolved policy for one direction, as datapath keys.

A key is (peer identity, protocol, first port, last port); identity 0 is
"any peer", protocol 0 is "any protocol" (and then the ports are 0-65535).
For ICMP and ICMPv6 the "port" is the ICMP type. A value is a verdict
(allow, deny, or redirect to the L7 proxy with the L7 rules that apply to
that peer) plus the names of the rules it came from.

Lookup is the contract the kernel program implements too: every key that
matches the packet is considered, deny beats redirect beats allow, and no
match means deny when the direction is enforced, allow otherwise. Because
the combination is order-free, the result never depends on rule order.

Tiers (ClusterNetworkPolicy). A key also carries a precedence: 0 for the
rules above (the normal tier), above 0 for Admin-tier rules (an earlier rule
is higher), below 0 for Baseline-tier rules (an earlier rule is higher, all
below 0). Keys of different precedence never merge. Lookup then goes tier by
tier: the matching Admin key of highest precedence decides (a Pass verdict
there means "ignore every Admin key"); else the normal keys decide as above;
else, when the direction is not enforced, the matching Baseline key of
highest precedence decides (Pass: allow); else the packet is allowed.
Within one precedence deny beats pass beats redirect beats allow.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import chain
from typing import Literal

from flagella.errors import ResolutionError
from flagella.policy.api import HTTPRule, KafkaRule

ANY_IDENTITY = 0
ANY_PROTOCOL = 0
PORT_MAX = 65535


class Direction(IntEnum):
    """Which way traffic flows, from the endpoint's point of view. The values are the
    kernel's encoding (metrics and events, ``bpf/flagella.h``)."""

    INGRESS = 1  # to the endpoint
    EGRESS = 2  # from the endpoint

    def __str__(self) -> str:
        return self.name.lower()


class Verdict(IntEnum):
    ALLOW = 1
    DENY = 2
    REDIRECT = 3
    #: Tiered keys only: skip the rest of the tier (Admin: let the normal tier decide).
    PASS = 4


@dataclass(frozen=True, order=True)
class Key:
    identity: int
    protocol: int
    port: int
    end_port: int
    #: 0: normal tier; > 0: Admin tier; < 0: Baseline tier (higher is evaluated first).
    precedence: int = 0

    def covers(self, other: Key) -> bool:
        """Whether every packet matching ``other`` also matches this key's L4 part."""
        return (
            self.protocol in (ANY_PROTOCOL, other.protocol)
            and self.port <= other.port
            and other.end_port <= self.end_port
        )

    def matches(self, identity: int, protocol: int, port: int) -> bool:
        return (
            self.identity in (ANY_IDENTITY, identity)
            and self.protocol in (ANY_PROTOCOL, protocol)
            and self.port <= port <= self.end_port
        )


@dataclass(frozen=True)
class L7Policy:
    """The L7 rules a redirected peer is held to. ``wildcard`` allows every request."""

    parser: Literal["http", "kafka"]
    http: frozenset[HTTPRule] = frozenset()
    kafka: frozenset[KafkaRule] = frozenset()
    wildcard: bool = False

    def merge(self, other: L7Policy) -> L7Policy:
        if other.parser != self.parser:
            raise ResolutionError(
                f"Cannot merge conflicting L7 parsers ({self.parser} and {other.parser})"
            )
        return L7Policy(
            self.parser,
            self.http | other.http,
            self.kafka | other.kafka,
            self.wildcard or other.wildcard,
        )

    def with_wildcard(self) -> L7Policy:
        return self if self.wildcard else L7Policy(self.parser, self.http, self.kafka, True)


@dataclass(frozen=True)
class Entry:
    verdict: Verdict
    l7: L7Policy | None = None
    rules: frozenset[str] = field(default_factory=frozenset)

    def merge(self, other: Entry) -> Entry:
        rules = self.rules | other.rules
        for strongest in (Verdict.DENY, Verdict.PASS):
            if strongest in (self.verdict, other.verdict):
                kept = frozenset().union(
                    *(e.rules for e in (self, other) if e.verdict == strongest)
                )
                return Entry(strongest, None, kept)
        if self.verdict == Verdict.REDIRECT and other.verdict == Verdict.REDIRECT:
            assert self.l7 is not None and other.l7 is not None
            return Entry(Verdict.REDIRECT, self.l7.merge(other.l7), rules)
        if Verdict.REDIRECT in (self.verdict, other.verdict):
            # A plain allow on the same key is an L7 wildcard for that peer (spec 3.3).
            l7 = self.l7 if self.l7 is not None else other.l7
            assert l7 is not None
            return Entry(Verdict.REDIRECT, l7.with_wildcard(), rules)
        return Entry(Verdict.ALLOW, None, rules)


@dataclass(frozen=True)
class Decision:
    """The result of a lookup: what the datapath does with the packet."""

    verdict: Verdict
    enforced: bool
    #: The keys that matched (all of them, for explanation).
    matched: tuple[tuple[Key, Entry], ...] = ()
    l7: L7Policy | None = None
    #: Precedence of the keys that decided (0: the normal tier, or no key at all).
    precedence: int = 0

    @property
    def allowed(self) -> bool:
        return self.verdict != Verdict.DENY

    @property
    def rules(self) -> frozenset[str]:
        deciding = [
            e for k, e in self.matched
            if e.verdict == self.verdict and k.precedence == self.precedence
        ]
        return frozenset().union(*(e.rules for e in deciding)) if deciding else frozenset()


#: A MapState keeps its entries in this many chunks (by peer identity), copied on write
#: one by one: a change after a copy costs a chunk, not the whole state.
_CHUNKS = 64
#: The chunks nothing was written to yet, shared by every state and never written.
_NO_ENTRIES: dict[Key, Entry] = {}
_NO_KEYS: dict[int, Key | set[Key]] = {}


class MapState:
    """All keys of one endpoint and direction.

    Copies are cheap and changes are journaled, so that an enforcer realizes only
    what changed (see `flagella.datapath.realizer`):

    * :meth:`copy` is O(1) in the number of keys: the copy shares the containers,
      which are split into chunks by peer identity, and whichever of the two is
      changed takes its own copy of the chunk it changes (copy-on-write; the
      per-identity key sets are copied one by one, as they are touched);
    * every change appends its key to a journal shared by a state and its copies;
      a copy remembers how far the journal went, so :meth:`changed_since` answers
      which keys a later copy may hold differently from an earlier one. Only the
      state copies were taken from writes the journal: a changed copy starts a
      journal of its own, which no earlier state shares (``changed_since`` then says
      None: unknown). The journal is restarted when it outgrows the state.
    """

    def __init__(self, enforced: bool, entries: dict[Key, Entry] | None = None) -> None:
        self.enforced = enforced
        #: Chunk i holds the keys whose identity % _CHUNKS is i, and their key sets.
        self._chunks: list[dict[Key, Entry]] = [_NO_ENTRIES] * _CHUNKS
        #: identity -> its key, or the set of its keys when it has several.
        self._ids: list[dict[int, Key | set[Key]]] = [_NO_KEYS] * _CHUNKS
        self._len = 0
        #: Chunks, and identities' key sets, private to this state (not shared by a copy).
        self._owned_chunks: set[int] = set()
        self._owned: set[int] = set()
        self._journal: list[Key] = []
        #: How far this state has seen the journal: None while it is its writer.
        self._journal_end: int | None = None
        self._view = _Entries(self)
        for k, e in (entries or {}).items():
            self.add(k, e)

    @property
    def entries(self) -> Mapping[Key, Entry]:
        """Key -> entry (read only: change it with :meth:`add`, :meth:`set`, ...)."""
        return self._view

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[Key, Entry]]:
        return chain.from_iterable(c.items() for c in self._chunks if c)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MapState)
            and self.enforced == other.enforced
            and self._len == other._len
            and self._chunks == other._chunks
        )

    def __repr__(self) -> str:
        return f"MapState(enforced={self.enforced}, entries={self._len})"

    # -- changes (each one journaled) ------------------------------------------------------

    def _changing(self, key: Key) -> dict[Key, Entry]:
        """Journal ``key`` and make its chunk private; return the chunk."""
        c = key.identity % _CHUNKS
        if c not in self._owned_chunks:
            self._chunks[c] = self._chunks[c].copy()
            self._ids[c] = self._ids[c].copy()
            self._owned_chunks.add(c)
        if self._journal_end is not None:  # a copy that changes: a journal of its own
            self._journal, self._journal_end = [], None
        if len(self._journal) > 2 * self._len + 1024:
            self._journal = []  # earlier copies' changed_since is unknown from here on
        self._journal.append(key)
        return self._chunks[c]

    def _index(self, key: Key) -> None:
        """Count a new key and index it by identity (after :meth:`_changing`)."""
        self._len += 1
        ident = key.identity
        ids = self._ids[ident % _CHUNKS]
        keys = ids.get(ident)
        if keys is None:
            ids[ident] = key  # (most identities have one key: no set for them)
        elif isinstance(keys, Key):
            ids[ident] = {keys, key}
            self._owned.add(ident)
        else:
            if ident not in self._owned:
                keys = ids[ident] = set(keys)
                self._owned.add(ident)
            keys.add(key)

    def add(self, key: Key, entry: Entry) -> None:
        chunk = self._changing(key)
        old = chunk.get(key)
        if old is None:
            chunk[key] = entry
            self._index(key)
        else:
            chunk[key] = old.merge(entry)

    def set(self, key: Key, entry: Entry) -> None:
        chunk = self._changing(key)
        if key not in chunk:
            self._index(key)
        chunk[key] = entry

    def replace_identity(self, identity: int, entries: dict[Key, Entry]) -> None:
        """Swap all keys of one identity for ``entries`` (all of that identity)."""
        old = self.keys_of(identity)
        for k in old:
            del self._changing(k)[k]
        if old:  # (the chunk is private now)
            del self._ids[identity % _CHUNKS][identity]
            self._owned.discard(identity)
            self._len -= len(old)
        for k, e in entries.items():
            self.set(k, e)

    # -- copies and their differences -------------------------------------------------------

    def copy(self) -> MapState:
        """An independent copy (entries are immutable; containers copy on write)."""
        out = MapState(self.enforced)
        out._chunks, out._ids, out._len = self._chunks.copy(), self._ids.copy(), self._len
        self._owned_chunks, self._owned = set(), set()
        out._journal = self._journal
        out._journal_end = len(self._journal) if self._journal_end is None else self._journal_end
        return out

    def changed_since(self, earlier: MapState) -> frozenset[Key] | None:
        """The keys whose entries may differ between ``earlier`` and this state, when
        both are copies of one state and ``earlier`` was taken first; None when the
        journal cannot tell (then compare the entries: :func:`changed_keys`)."""
        end = len(self._journal) if self._journal_end is None else self._journal_end
        start = earlier._journal_end
        if earlier._journal is not self._journal or start is None or start > end:
            return None
        return frozenset(self._journal[start:end])

    def keys_of(self, identity: int) -> list[Key]:
        keys = self._ids[identity % _CHUNKS].get(identity)
        if keys is None:
            return []
        return [keys] if isinstance(keys, Key) else list(keys)

    def lookup(self, identity: int, protocol: int, port: int) -> Decision:
        matched = tuple((k, e) for k, e in self if k.matches(identity, protocol, port))
        return decide(matched, self.enforced)


class _Entries(Mapping[Key, Entry]):
    """A read-only view of a MapState's entries, across its chunks."""

    __slots__ = ("_state",)

    def __init__(self, state: MapState) -> None:
        self._state = state

    def __getitem__(self, key: Key) -> Entry:
        return self._state._chunks[key.identity % _CHUNKS][key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, Key) and key in self._state._chunks[key.identity % _CHUNKS]

    def __iter__(self) -> Iterator[Key]:
        return chain.from_iterable(self._state._chunks)

    def __len__(self) -> int:
        return self._state._len


def changed_keys(a: MapState, b: MapState) -> set[Key]:
    """The keys whose entries differ between ``a`` and ``b`` (absent in one counts), by
    comparing them (chunks a copy still shares are equal): what
    :meth:`MapState.changed_since` answers from its journal."""
    out: set[Key] = set()
    for ca, cb in zip(a._chunks, b._chunks, strict=True):
        if ca is cb:
            continue
        out.update(k for k, e in cb.items() if (o := ca.get(k)) is not e and o != e)
        out.update(k for k in ca if k not in cb)
    return out


def decide(matched: Iterable[tuple[Key, Entry]], enforced: bool) -> Decision:
    hits = tuple(sorted(matched))
    admin = [(k, e) for k, e in hits if k.precedence > 0]
    if admin:
        top = max(k.precedence for k, _ in admin)
        verdict, l7 = _combine([e for k, e in admin if k.precedence == top])
        if verdict != Verdict.PASS:
            return Decision(verdict, enforced, hits, l7, top)
    normal = [e for k, e in hits if k.precedence == 0]
    verdict, l7 = _combine(normal)
    if normal and verdict != Verdict.PASS:
        return Decision(verdict, enforced, hits, l7)
    if enforced:
        return Decision(Verdict.DENY, enforced, hits)
    baseline = [(k, e) for k, e in hits if k.precedence < 0]
    if baseline:
        top = max(k.precedence for k, _ in baseline)
        verdict, l7 = _combine([e for k, e in baseline if k.precedence == top])
        if verdict != Verdict.PASS:
            return Decision(verdict, enforced, hits, l7, top)
    return Decision(Verdict.ALLOW, enforced, hits)


def _combine(entries: list[Entry]) -> tuple[Verdict, L7Policy | None]:
    """The verdict of keys of one precedence: deny > pass > redirect > allow."""
    verdicts = {e.verdict for e in entries}
    for strongest in (Verdict.DENY, Verdict.PASS):
        if strongest in verdicts:
            return strongest, None
    if Verdict.REDIRECT in verdicts:
        l7: L7Policy | None = None
        for e in entries:
            if e.l7 is not None:
                l7 = e.l7 if l7 is None else l7.merge(e.l7)
        return Verdict.REDIRECT, l7
    return Verdict.ALLOW, None


def port_blocks(first: int, last: int) -> list[tuple[int, int]]:
    """Split [first, last] into power-of-two aligned blocks as (base, wildcard bits).

    This is how a port range becomes a bounded number of exact-match keys in
    the kernel's hash map: a packet's port matches block (base, n) iff
    ``port & ~((1 << n) - 1) == base``.

    >>> port_blocks(8080, 8083)
    [(8080, 2)]
    """
    if not 0 <= first <= last <= PORT_MAX:
        raise ValueError(f"port range {first}-{last}: must be within 0-65535")
    blocks = []
    port = first
    while port <= last:
        bits = 0
        while bits < 16:
            size = 1 << (bits + 1)
            if port % size != 0 or port + size - 1 > last:
                break
            bits += 1
        blocks.append((port, bits))
        port += 1 << bits
    return blocks
