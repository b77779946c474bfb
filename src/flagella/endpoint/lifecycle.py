"""Endpoint lifecycle as a transition table (Cilium's endpoint states).

    init -> waiting-for-identity -> regenerating -> waiting-for-enforcers -> ready
    ready -> regenerating -> waiting-for-enforcers -> ready   (policy or identity changed)
    regenerating | waiting-for-enforcers -> not-ready         (an enforcer failed or timed out)
    not-ready -> regenerating                                 (retry, after a backoff)
    any live state -> disconnecting -> disconnected
    restoring -> regenerating                                 (agent restart)

``waiting-for-enforcers`` means the policy was handed to every enforcer (the
kernel datapath, the xDS server) and the regeneration waits for each one's
completion; ``not-ready`` carries the reason (``Endpoint.state_reason``).
The regeneration pipeline (`flagella.endpoint.regeneration`) drives these
states; the agent drives the others.

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
    WAITING_FOR_ENFORCERS = "waiting-for-enforcers"
    NOT_READY = "not-ready"
    READY = "ready"
    DISCONNECTING = "disconnecting"
    DISCONNECTED = "disconnected"


_LIVE = {
    State.INIT,
    State.RESTORING,
    State.WAITING_FOR_IDENTITY,
    State.WAITING_TO_REGENERATE,
    State.REGENERATING,
    State.WAITING_FOR_ENFORCERS,
    State.NOT_READY,
    State.READY,
}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.INIT: frozenset({State.WAITING_FOR_IDENTITY, State.DISCONNECTING}),
    State.RESTORING: frozenset({State.REGENERATING, State.WAITING_FOR_IDENTITY, State.DISCONNECTING}),
    State.WAITING_FOR_IDENTITY: frozenset({State.REGENERATING, State.DISCONNECTING}),
    State.WAITING_TO_REGENERATE: frozenset({State.REGENERATING, State.DISCONNECTING}),
    State.REGENERATING: frozenset(
        {
            State.READY,  # every completion arrived with the apply (e.g. the kernel alone)
            State.WAITING_FOR_ENFORCERS,
            State.NOT_READY,
            State.WAITING_TO_REGENERATE,
            State.DISCONNECTING,
        }
    ),
    State.WAITING_FOR_ENFORCERS: frozenset(
        {State.READY, State.NOT_READY, State.REGENERATING, State.DISCONNECTING}
    ),
    State.NOT_READY: frozenset(
        {State.REGENERATING, State.WAITING_FOR_IDENTITY, State.DISCONNECTING}
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
