"""Endpoint lifecycle as a transition table (Cilium's endpoint states).

    init -> waiting-for-identity -> regenerating -> ready
    ready -> regenerating -> ready        (policy or identity changed)
    any live state -> disconnecting -> disconnected
    restoring -> regenerating             (agent restart)

Only this table decides what may follow what; `transition` raises on
anything else, so a bug shows up as an error instead of a half-built
endpoint.
"""

from __future__ import annotations

from enum import StrEnum

from flagella.errors import FlagellaError


class State(StrEnum):
    INIT = "init"
    RESTORING = "restoring"
    WAITING_FOR_IDENTITY = "waiting-for-identity"
    WAITING_TO_REGENERATE = "waiting-to-regenerate"
    REGENERATING = "regenerating"
    READY = "ready"
    DISCONNECTING = "disconnecting"
    DISCONNECTED = "disconnected"


_LIVE = {
    State.INIT,
    State.RESTORING,
    State.WAITING_FOR_IDENTITY,
    State.WAITING_TO_REGENERATE,
    State.REGENERATING,
    State.READY,
}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.INIT: frozenset({State.WAITING_FOR_IDENTITY, State.DISCONNECTING}),
    State.RESTORING: frozenset({State.REGENERATING, State.WAITING_FOR_IDENTITY, State.DISCONNECTING}),
    State.WAITING_FOR_IDENTITY: frozenset({State.REGENERATING, State.DISCONNECTING}),
    State.WAITING_TO_REGENERATE: frozenset({State.REGENERATING, State.DISCONNECTING}),
    State.REGENERATING: frozenset(
        {State.READY, State.WAITING_TO_REGENERATE, State.REGENERATING, State.DISCONNECTING}
    ),
    State.READY: frozenset(
        {State.REGENERATING, State.WAITING_TO_REGENERATE, State.WAITING_FOR_IDENTITY, State.DISCONNECTING}
    ),
    State.DISCONNECTING: frozenset({State.DISCONNECTED}),
    State.DISCONNECTED: frozenset(),
}


class IllegalTransition(FlagellaError):
    pass


def transition(current: State, new: State) -> State:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"endpoint state {current.value} cannot go to {new.value}")
    return new


def is_live(state: State) -> bool:
    return state in _LIVE
