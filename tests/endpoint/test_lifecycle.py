"""The endpoint lifecycle table: every legal transition is allowed, every other one raises."""

from __future__ import annotations

import itertools

import pytest

from flagella.endpoint.lifecycle import TRANSITIONS, IllegalTransition, State, is_live, transition

LEGAL = sorted((a, b) for a, targets in TRANSITIONS.items() for b in targets)
ILLEGAL = sorted((a, b) for a, b in itertools.product(State, State) if b not in TRANSITIONS[a])


def test_the_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(("current", "new"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_legal_transitions_return_the_new_state(current: State, new: State) -> None:
    assert transition(current, new) is new


@pytest.mark.parametrize(("current", "new"), ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_illegal_transitions_raise_and_name_both_states(current: State, new: State) -> None:
    with pytest.raises(IllegalTransition, match=f"{current.value} cannot go to {new.value}"):
        transition(current, new)


def test_the_documented_paths() -> None:
    path = [State.INIT, State.WAITING_FOR_IDENTITY, State.REGENERATING, State.READY,
            State.REGENERATING, State.READY, State.DISCONNECTING, State.DISCONNECTED]
    state = path[0]
    for nxt in path[1:]:
        state = transition(state, nxt)
    assert state is State.DISCONNECTED
    assert transition(State.RESTORING, State.REGENERATING) is State.REGENERATING


def test_every_live_state_can_disconnect_and_the_dead_ones_cannot_come_back() -> None:
    live = {s for s in State if is_live(s)}
    assert live == set(State) - {State.DISCONNECTING, State.DISCONNECTED}
    for s in live:
        assert transition(s, State.DISCONNECTING) is State.DISCONNECTING
    assert TRANSITIONS[State.DISCONNECTED] == frozenset()
    assert TRANSITIONS[State.DISCONNECTING] == {State.DISCONNECTED}
