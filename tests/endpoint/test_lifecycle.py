"""The endpoint lifecycle table: every legal transition, and only those."""

from __future__ import annotations

import pytest

from flagella.endpoint.lifecycle import TRANSITIONS, IllegalTransition, State, is_live, transition

LEGAL = {
    (State.INIT, State.WAITING_FOR_IDENTITY),
    (State.WAITING_FOR_IDENTITY, State.REGENERATING),
    (State.REGENERATING, State.WAITING_FOR_ENFORCERS),
    (State.REGENERATING, State.READY),
    (State.REGENERATING, State.NOT_READY),
    (State.WAITING_FOR_ENFORCERS, State.READY),
    (State.WAITING_FOR_ENFORCERS, State.NOT_READY),
    (State.WAITING_FOR_ENFORCERS, State.REGENERATING),
    (State.NOT_READY, State.REGENERATING),
    (State.READY, State.REGENERATING),
    (State.RESTORING, State.REGENERATING),
    (State.DISCONNECTING, State.DISCONNECTED),
}


@pytest.mark.parametrize("state", list(State))
def test_every_state_has_a_row(state: State) -> None:
    assert state in TRANSITIONS


@pytest.mark.parametrize("pair", sorted(LEGAL))
def test_the_regeneration_path_is_legal(pair: tuple[State, State]) -> None:
    assert transition(*pair) == pair[1]


@pytest.mark.parametrize("state", [s for s in State if is_live(s)])
def test_every_live_state_can_be_disconnected(state: State) -> None:
    assert transition(state, State.DISCONNECTING) == State.DISCONNECTING


@pytest.mark.parametrize(
    "pair",
    [
        (State.INIT, State.READY),  # a pod without identity and policy is never ready
        (State.READY, State.WAITING_FOR_ENFORCERS),  # only a regeneration hands policy out
        (State.NOT_READY, State.READY),  # a failure is cured by a regeneration, not by fiat
        (State.DISCONNECTED, State.REGENERATING),
        (State.DISCONNECTING, State.READY),
    ],
)
def test_illegal_transitions_raise(pair: tuple[State, State]) -> None:
    with pytest.raises(IllegalTransition, match=f"{pair[0].value} cannot go to {pair[1].value}"):
        transition(*pair)


def test_disconnected_is_final_and_not_live() -> None:
    assert TRANSITIONS[State.DISCONNECTED] == frozenset()
    assert not is_live(State.DISCONNECTED) and not is_live(State.DISCONNECTING)
