"""MapState copies are independent, and the journal names every key that changed.

A random sequence of changes runs on one state, with copies taken in between; a
plain dict per copy is the model. Every copy must keep the entries it had when it
was taken, whatever happens to the state or to other copies afterwards, and
``changed_since`` must name (at least) every key two copies disagree on.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flagella.policy.mapstate import PORT_MAX, Entry, Key, MapState, Verdict, changed_keys

# Identities 1, 65 and 129 share a chunk; 0 is "any peer".
IDENTITIES = [0, 1, 2, 65, 129, 300]
KEYS = [
    Key(i, proto, first, last, prec)
    for i in IDENTITIES
    for proto, first, last in ((0, 0, PORT_MAX), (6, 80, 80), (6, 80, 83), (17, 53, 53))
    for prec in (0, 7)
]
ENTRIES = [Entry(Verdict.ALLOW), Entry(Verdict.DENY), Entry(Verdict.ALLOW, None, frozenset({"r"}))]

op = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(KEYS), st.sampled_from(ENTRIES)),
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.sampled_from(ENTRIES)),
    st.tuples(
        st.just("replace"),
        st.sampled_from(IDENTITIES),
        st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(ENTRIES)), max_size=3),
    ),
    st.tuples(st.just("copy")),
    # change one of the copies taken so far (index modulo their number)
    st.tuples(st.just("change-copy"), st.integers(0, 50), st.sampled_from(KEYS)),
)


def model_apply(model: dict[Key, Entry], step: tuple) -> None:  # type: ignore[type-arg]
    kind = step[0]
    if kind == "add":
        _, k, e = step
        model[k] = model[k].merge(e) if k in model else e
    elif kind == "set":
        _, k, e = step
        model[k] = e
    elif kind == "replace":
        _, ident, pairs = step
        for k in [k for k in model if k.identity == ident]:
            del model[k]
        for k, e in pairs:
            if k.identity == ident:
                model[k] = e


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60))
def test_copies_keep_their_entries_and_the_journal_names_every_change(steps: list) -> None:  # type: ignore[type-arg]
    state = MapState(True)
    model: dict[Key, Entry] = {}
    copies: list[tuple[MapState, dict[Key, Entry]]] = []
    for step in steps:
        kind = step[0]
        if kind == "copy":
            copies.append((state.copy(), dict(model)))
        elif kind == "change-copy":
            if copies:
                c, m = copies[step[1] % len(copies)]
                c.set(step[2], Entry(Verdict.PASS))
                m[step[2]] = Entry(Verdict.PASS)
        elif kind == "replace":
            _, ident, pairs = step
            state.replace_identity(ident, {k: e for k, e in pairs if k.identity == ident})
            model_apply(model, step)
        else:
            getattr(state, kind)(step[1], step[2])
            model_apply(model, step)
        assert dict(state.entries) == model and len(state) == len(model)
        for c, m in copies:
            assert dict(c) == m and len(c) == len(m)
    for ident in IDENTITIES:
        assert sorted(state.keys_of(ident)) == sorted(k for k in model if k.identity == ident)
    # The journal between two unchanged copies (and the state) names every difference.
    unchanged = [c for c, _ in copies if c.changed_since(c) is not None]
    for i, earlier in enumerate(unchanged):
        for later in [*unchanged[i:], state]:
            named = later.changed_since(earlier)
            assert named is not None and changed_keys(earlier, later) <= named


def test_a_changed_copy_is_not_on_the_journal_of_its_original() -> None:
    state = MapState(True)
    state.add(Key(1, 6, 80, 80), Entry(Verdict.ALLOW))
    copy = state.copy()
    copy.add(Key(2, 6, 80, 80), Entry(Verdict.ALLOW))
    state.add(Key(3, 6, 80, 80), Entry(Verdict.ALLOW))
    assert copy.changed_since(state.copy()) is None  # unknown: compare the entries instead
    assert changed_keys(state, copy) == {Key(2, 6, 80, 80), Key(3, 6, 80, 80)}
    later = state.copy()
    assert later.changed_since(copy) is None
    assert set(dict(later.entries)) == {Key(1, 6, 80, 80), Key(3, 6, 80, 80)}
