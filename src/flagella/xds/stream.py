"""Sans-IO state of one xDS stream: subscriptions, nonces, versions, ACK/NACK.

A stream (ADS, or a per-type service) carries one sub-stream per type URL.
`StreamState.receive` takes a decoded request and returns notes (ACK, NACK,
stale request ignored); `StreamState.next_response` takes the node's view of a
type from the cache and returns the encoded response to send, or None when
there is nothing to say. No grpc, no clock: the caller passes `now`.

Rules (spec/xds-envoy-istio.md §1.4, §1.5, §9):
- Nonces are per type. A SotW request whose nonce is not the last one sent for
  its type is stale and ignored whole. A delta request with a stale nonce still
  changes subscriptions; only its ACK/NACK part is ignored.
- `error_detail` is a NACK. The type is parked at the version Envoy rejected:
  nothing is resent while the node's view keeps that version, so there is no
  resend loop; a content change (a new version) un-parks it.
- Wildcard (LDS/CDS): a type whose requests never named a resource, or that
  names `*`. Once names were given, an empty list means "unsubscribe all".
- SotW answers when the view's version or the subscribed names changed since
  the last send; delta sends what the client lacks and `removed_resources`.

The per-type phase follows `TRANSITIONS`; an event with no entry is a bug in
the caller and raises `IllegalTransition`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flagella.errors import FlagellaError
from flagella.xds._wire import field_str
from flagella.xds.cache import CachedResource, TypeView, named_resources, subset_version
from flagella.xds.types import FULL_STATE

WILDCARD = "*"


class IllegalTransition(FlagellaError):
    """A per-type stream event that the transition table does not allow."""


class Phase(enum.Enum):
    UNSUBSCRIBED = "unsubscribed"
    PENDING = "pending"  # subscribed, nothing sent since
    SENT = "sent"  # awaiting ACK/NACK of the last response
    ACKED = "acked"
    NACKED = "nacked"  # parked until the content changes


class Event(enum.Enum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    SEND = "send"
    ACK = "ack"
    NACK = "nack"
    IN_SYNC = "in_sync"  # delta reconnect: the client's initial versions are already current


P, E = Phase, Event
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (P.UNSUBSCRIBED, E.SUBSCRIBE): P.PENDING,
    (P.UNSUBSCRIBED, E.UNSUBSCRIBE): P.UNSUBSCRIBED,
    (P.PENDING, E.SUBSCRIBE): P.PENDING,
    (P.PENDING, E.UNSUBSCRIBE): P.UNSUBSCRIBED,
    (P.PENDING, E.SEND): P.SENT,
    (P.PENDING, E.IN_SYNC): P.ACKED,
    (P.SENT, E.SUBSCRIBE): P.SENT,
    (P.SENT, E.UNSUBSCRIBE): P.UNSUBSCRIBED,
    (P.SENT, E.SEND): P.SENT,
    (P.SENT, E.ACK): P.ACKED,
    (P.SENT, E.NACK): P.NACKED,
    (P.ACKED, E.SUBSCRIBE): P.ACKED,
    (P.ACKED, E.UNSUBSCRIBE): P.UNSUBSCRIBED,
    (P.ACKED, E.SEND): P.SENT,
    (P.NACKED, E.SUBSCRIBE): P.NACKED,
    (P.NACKED, E.UNSUBSCRIBE): P.UNSUBSCRIBED,
    (P.NACKED, E.SEND): P.SENT,
}


@dataclass(frozen=True)
class Request:
    """A decoded DiscoveryRequest or DeltaDiscoveryRequest (the fields we use)."""

    type_url: str
    response_nonce: str = ""
    version_info: str = ""
    resource_names: Sequence[str] = ()  # SotW
    subscribe: Sequence[str] = ()  # delta
    unsubscribe: Sequence[str] = ()  # delta
    initial_versions: Mapping[str, str] = field(default_factory=dict)  # delta
    error: str | None = None  # error_detail.message when error_detail is present


@dataclass(frozen=True)
class Acked:
    type_url: str
    version: str
    nonce: str


@dataclass(frozen=True)
class Nacked:
    type_url: str
    version: str
    nonce: str
    error: str


@dataclass(frozen=True)
class Ignored:
    type_url: str
    nonce: str
    reason: str


@dataclass(frozen=True)
class Subscribed:
    """The subscription of a type changed (or began): it needs an answer now."""

    type_url: str


Note = Acked | Nacked | Ignored | Subscribed


@dataclass(frozen=True)
class Response:
    """An encoded response plus what it carried, for status and metrics."""

    type_url: str
    version: str
    nonce: str
    names: tuple[str, ...]
    removed: tuple[str, ...]
    payload: bytes


@dataclass
class TypeState:
    """One type's sub-stream. `known` is what the client holds (name -> resource version)."""

    phase: Phase = Phase.UNSUBSCRIBED
    names: set[str] = field(default_factory=set)
    ever_named: bool = False
    explicit_wildcard: bool = False
    names_at_send: frozenset[str] | None = None
    nonce_sent: str = ""
    version_sent: str = ""
    version_acked: str = ""
    parked_version: str | None = None
    last_error: str = ""
    last_ack_time: float | None = None
    known: dict[str, str] = field(default_factory=dict)
    known_before_send: dict[str, str] = field(default_factory=dict)
    reported_absent: set[str] = field(default_factory=set)
    sent: dict[str, CachedResource] = field(default_factory=dict)

    def fire(self, event: Event) -> None:
        nxt = TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise IllegalTransition(f"xds stream type state {self.phase.value}: {event.value} not allowed")
        self.phase = nxt

    @property
    def wildcard(self) -> bool:
        return self.explicit_wildcard or not self.ever_named

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def version_of(self, view: TypeView) -> str:
        """The version of what this subscription wants of ``view``: the view's own when it
        wants all of it, else the content version of the resources it names. So a change to
        resources a stream did not ask for (another sidecar's filters) is no change for it:
        nothing is sent, and no completion waits for its ACK."""
        return view.version if self.wildcard else subset_version(view, self.names)


class StreamState:
    """Every type's state on one stream; `delta` picks the incremental variant."""

    def __init__(self, *, delta: bool, wildcard_types: frozenset[str] = FULL_STATE) -> None:
        self.delta = delta
        self.types: dict[str, TypeState] = {}
        self._wildcard_types = wildcard_types
        self._nonce = 0

    def state(self, type_url: str) -> TypeState:
        return self.types.setdefault(type_url, TypeState())

    # -- receiving -----------------------------------------------------------

    def receive(self, request: Request, now: float) -> list[Note]:
        ts = self.state(request.type_url)
        nonce = request.response_nonce
        stale = bool(nonce) and nonce != ts.nonce_sent
        if stale and not self.delta:
            return [Ignored(request.type_url, nonce, "stale nonce")]
        notes: list[Note] = []
        if nonce and not stale and ts.phase is Phase.SENT:
            notes.append(self._ack_or_nack(ts, request, now))
        elif stale:
            notes.append(Ignored(request.type_url, nonce, "stale nonce"))
        before = (ts.phase is Phase.UNSUBSCRIBED, frozenset(ts.names), ts.wildcard)
        if self.delta:
            self._delta_subscriptions(ts, request)
        else:
            self._sotw_subscriptions(ts, request)
        after = (ts.phase is Phase.UNSUBSCRIBED, frozenset(ts.names), ts.wildcard)
        if after != before and ts.phase is not Phase.UNSUBSCRIBED:
            notes.append(Subscribed(request.type_url))
        return notes

    def _ack_or_nack(self, ts: TypeState, request: Request, now: float) -> Note:
        if request.error is not None:
            ts.fire(Event.NACK)
            ts.parked_version = ts.version_sent
            ts.last_error = request.error
            ts.known = ts.known_before_send
            return Nacked(request.type_url, ts.version_sent, request.response_nonce, request.error)
        ts.fire(Event.ACK)
        ts.version_acked = ts.version_sent
        ts.parked_version = None
        ts.last_ack_time = now
        return Acked(request.type_url, ts.version_sent, request.response_nonce)

    def _wildcard_allowed(self, type_url: str) -> bool:
        return type_url in self._wildcard_types

    def _sotw_subscriptions(self, ts: TypeState, request: Request) -> None:
        names = set(request.resource_names)
        if names:
            ts.ever_named = True
        ts.explicit_wildcard = WILDCARD in names
        ts.names = names - {WILDCARD}
        if not self._wildcard_allowed(request.type_url) and not ts.names:
            ts.ever_named = True  # no wildcard for this type: no names is nothing
        if ts.wildcard or ts.names:
            ts.fire(Event.SUBSCRIBE)
        else:
            ts.fire(Event.UNSUBSCRIBE)

    def _delta_subscriptions(self, ts: TypeState, request: Request) -> None:
        if request.initial_versions and ts.phase is Phase.UNSUBSCRIBED:
            ts.known = dict(request.initial_versions)
        sub, unsub = set(request.subscribe), set(request.unsubscribe)
        first = ts.phase is Phase.UNSUBSCRIBED and not ts.ever_named
        if sub - {WILDCARD}:
            ts.ever_named = True
        if WILDCARD in sub:
            ts.explicit_wildcard = True
        if WILDCARD in unsub:
            ts.explicit_wildcard = False
            ts.ever_named = True
        ts.names |= sub - {WILDCARD}
        ts.names -= unsub
        for name in unsub:
            ts.known.pop(name, None)
            ts.reported_absent.discard(name)
        if not self._wildcard_allowed(request.type_url):
            ts.ever_named = True
        if first and not sub and not unsub and not self._wildcard_allowed(request.type_url):
            ts.fire(Event.UNSUBSCRIBE)
        elif ts.wildcard or ts.names:
            ts.fire(Event.SUBSCRIBE)
        else:
            ts.fire(Event.UNSUBSCRIBE)

    # -- sending ---------------------------------------------------------------

    def _next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    def next_response(self, view: TypeView) -> Response | None:
        """The response `view` calls for, or None (nothing changed, or parked after a NACK)."""
        ts = self.types.get(view.type_url)
        if ts is None or ts.phase is Phase.UNSUBSCRIBED:
            return None
        if self.delta:
            return self._delta_response(ts, view)
        return self._sotw_response(ts, view)

    def _sotw_response(self, ts: TypeState, view: TypeView) -> Response | None:
        subscription = frozenset(ts.names | ({WILDCARD} if ts.wildcard else set()))
        version = ts.version_of(view)
        wanted = dict(view.resources) if ts.wildcard else named_resources(view, ts.names)
        names_changed = subscription != ts.names_at_send
        if not names_changed and version == ts.version_sent:
            return None
        if ts.phase is Phase.NACKED and not names_changed and version == ts.parked_version:
            return None
        nonce = self._next_nonce()
        ordered = sorted(wanted)
        payload = b"".join(
            [field_str(1, version)]
            + [wanted[n].sotw_field for n in ordered]
            + [field_str(4, view.type_url), field_str(5, nonce)]
        )
        ts.fire(Event.SEND)
        ts.names_at_send = subscription
        ts.nonce_sent, ts.version_sent = nonce, version
        ts.sent = wanted
        return Response(view.type_url, version, nonce, tuple(ordered), (), payload)

    def _delta_response(self, ts: TypeState, view: TypeView) -> Response | None:
        version = ts.version_of(view)
        if ts.phase is Phase.NACKED and version == ts.parked_version:
            return None
        changed = [
            n
            for n, r in sorted(view.resources.items())
            if ts.wants(n) and ts.known.get(n) != r.version
        ]
        removed = sorted(n for n in ts.known if n not in view.resources or not ts.wants(n))
        absent = sorted(
            n for n in ts.names if n not in view.resources and n not in ts.known and n not in ts.reported_absent
        )
        if not changed and not removed and not absent:
            if ts.phase is Phase.PENDING and not ts.nonce_sent and ts.known:
                ts.fire(Event.IN_SYNC)
                ts.version_sent = ts.version_acked = version
            return None
        nonce = self._next_nonce()
        payload = b"".join(
            [field_str(1, version)]
            + [view.resources[n].delta_field for n in changed]
            + [field_str(4, view.type_url), field_str(5, nonce)]
            + [field_str(6, n) for n in removed + absent]
        )
        ts.fire(Event.SEND)
        ts.known_before_send = dict(ts.known)
        for n in changed:
            ts.known[n] = view.resources[n].version
        for n in removed:
            del ts.known[n]
        ts.reported_absent -= set(changed)
        ts.reported_absent |= set(absent) | {n for n in removed if n in ts.names}
        ts.nonce_sent, ts.version_sent = nonce, version
        ts.sent = {n: view.resources[n] for n in ts.known if n in view.resources}
        return Response(view.type_url, version, nonce, tuple(changed), tuple(removed + absent), payload)
