"""The pure parts: cache (incremental == fresh snapshot), stream transitions, status rendering."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flagella.xds import NodeStatus, ResourceCache, StreamState, TypeStatus, render_proxy_status
from flagella.xds.cache import content_version, named_resources, subset_version
from flagella.xds.status import rows_from_json
from flagella.xds.stream import TRANSITIONS, Event, IllegalTransition, Phase, Request, TypeState
from flagella.xds.types import CLUSTER, EXTENSION_CONFIG

from .helpers import cluster, rbac_filter

NAMES = st.sampled_from(["a", "b", "c", "d"])
OPS = st.lists(
    st.tuples(st.sampled_from(["upsert", "remove", "set", "base"]), st.one_of(st.none(), st.sampled_from(["n1", "n2"])),
              st.dictionaries(NAMES, st.integers(1, 3), max_size=3)),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_incremental_updates_equal_a_fresh_snapshot(ops: list[tuple[str, str | None, dict[str, int]]]) -> None:
    live = ResourceCache()
    model: dict[str | None, dict[str, int]] = {None: {}, "n1": {}, "n2": {}}
    base: dict[str, int] = {}
    for op, node, items in ops:
        if op == "base":  # the layer under the global set (not per node)
            live.set_base(CLUSTER, {n: cluster(n, t) for n, t in items.items()})
            base = dict(items)
        elif op == "upsert":
            live.update(CLUSTER, {n: cluster(n, t) for n, t in items.items()}, node=node)
            model[node].update(items)
        elif op == "remove":
            live.update(CLUSTER, removals=list(items), node=node)
            for n in items:
                model[node].pop(n, None)
        else:
            live.set_resources(CLUSTER, {n: cluster(n, t) for n, t in items.items()}, node=node)
            model[node] = dict(items)
        for who in ("n1", "n2"):
            live.view(who, CLUSTER)  # memoized views must be invalidated correctly
    fresh = ResourceCache()
    fresh.set_base(CLUSTER, {n: cluster(n, t) for n, t in base.items()})
    for node, items in model.items():
        fresh.set_resources(CLUSTER, {n: cluster(n, t) for n, t in items.items()}, node=node)
    for who in ("n1", "n2", "n3"):
        a, b = live.view(who, CLUSTER), fresh.view(who, CLUSTER)
        assert a.version == b.version
        assert {n: r.sotw_field for n, r in a.resources.items()} == {n: r.sotw_field for n, r in b.resources.items()}
        # Layers: the node's own over the global over the base.
        expected = {**base, **model[None], **model.get(who, {})}
        want = ResourceCache()
        want.set_resources(CLUSTER, {n: cluster(n, t) for n, t in expected.items()})
        assert {n: r.value for n, r in a.resources.items()} == {
            n: r.value for n, r in want.view(who, CLUSTER).resources.items()
        }


def test_serialized_once_and_shared() -> None:
    cache = ResourceCache()
    cache.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/a"), "b": rbac_filter("b", "/b")})
    assert cache.serializations == 2
    views = [cache.view(f"node-{i}", EXTENSION_CONFIG) for i in range(50)]
    cache.update(EXTENSION_CONFIG, {"a": rbac_filter("a", "/a2")})
    assert cache.serializations == 3
    after = [cache.view(f"node-{i}", EXTENSION_CONFIG) for i in range(50)]
    assert all(v.resources["b"] is views[0].resources["b"] for v in after)
    assert len({v.version for v in after}) == 1 and after[0].version != views[0].version


def test_every_phase_event_pair_is_in_the_table_or_raises() -> None:
    for phase in Phase:
        for event in Event:
            state = TypeState(phase=phase)
            if (phase, event) in TRANSITIONS:
                state.fire(event)
                assert state.phase is TRANSITIONS[(phase, event)]
            else:
                with pytest.raises(IllegalTransition):
                    state.fire(event)


def test_sotw_stream_core_without_io() -> None:
    cache = ResourceCache()
    cache.set_resources(EXTENSION_CONFIG, {"a": rbac_filter("a", "/a")})
    stream = StreamState(delta=False)
    stream.receive(Request(EXTENSION_CONFIG, resource_names=["a"]), now=1.0)
    first = stream.next_response(cache.view("n", EXTENSION_CONFIG))
    assert first is not None and first.names == ("a",)
    assert stream.next_response(cache.view("n", EXTENSION_CONFIG)) is None  # nothing changed
    [note] = stream.receive(Request(EXTENSION_CONFIG, first.nonce, first.version, ["a"], error="bad"), now=2.0)
    assert note.__class__.__name__ == "Nacked"
    assert stream.next_response(cache.view("n", EXTENSION_CONFIG)) is None  # parked


def _row(error: str = "") -> NodeStatus:
    return NodeStatus(
        node="envoy-1",
        cluster="c",
        stream="ads",
        connected_at=0.0,
        types=(
            TypeStatus(CLUSTER, "v2", "3", "v2", "", 60.0, "acked"),
            TypeStatus(EXTENSION_CONFIG, "v9", "4", "v8", error, 61.0, "nacked" if error else "sent"),
        ),
    )


def test_render_proxy_status_text_and_json() -> None:
    text = render_proxy_status([_row("bad regex")], "text")
    header, line = text.splitlines()[:2]
    assert header.split() == ["NODE", "STREAM", "CDS", "ECDS"]
    assert "SYNCED" in line and "NACKED" in line
    assert "envoy-1 ECDS last NACK: bad regex" in text
    assert "STALE" in render_proxy_status([_row()], "text")
    [doc] = json.loads(render_proxy_status([_row("x")], "json"))
    assert doc["types"][1]["last_error"] == "x" and doc["types"][1]["version_acked"] == "v8"
    assert rows_from_json(json.loads(render_proxy_status([_row("x")], "json"))) == [_row("x")]
    with pytest.raises(ValueError, match="output"):
        render_proxy_status([], "yaml")


STEP = st.one_of(
    st.tuples(st.just("request"), st.lists(st.sampled_from(["a", "b", "*"]), max_size=3),
              st.sampled_from(["", "latest", "old", "junk"]), st.booleans()),
    st.tuples(st.just("change"), st.sampled_from(["a", "b"]), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("send"), st.none(), st.none(), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.sampled_from([CLUSTER, EXTENSION_CONFIG]), st.lists(STEP, max_size=25))
def test_stream_core_random_sequences(delta: bool, type_url: str, steps: list[tuple[object, ...]]) -> None:
    """Any request sequence is handled without an illegal transition; stale nonces never
    change ACK state in SotW; a NACKed type is not resent until the content changes."""
    cache = ResourceCache()
    stream = StreamState(delta=delta)
    build = cluster if type_url == CLUSTER else (lambda n, v: rbac_filter(n, f"/{v}"))
    old_nonce = ""
    for kind, a, b, c in steps:
        ts = stream.types.get(type_url)
        if kind == "change":
            if c:
                cache.update(type_url, {str(a): build(str(a), b)})  # type: ignore[operator]
            else:
                cache.update(type_url, removals=[str(a)])
        elif kind == "send":
            view = cache.view("n", type_url)
            previous_nonce = ts.nonce_sent if ts else ""
            subscription_unchanged = ts is not None and ts.names_at_send == frozenset(
                ts.names | ({"*"} if ts.wildcard else set())
            )
            parked = ts is not None and ts.phase is Phase.NACKED and ts.parked_version == view.version
            response = stream.next_response(view)
            if parked and (delta or subscription_unchanged):
                assert response is None
            if response is not None:
                old_nonce = previous_nonce
                assert len(set(response.names)) == len(response.names)  # never duplicate names
        else:
            nonce = {"": "", "latest": ts.nonce_sent if ts else "", "old": old_nonce, "junk": "zz"}[str(b)]
            before = None if ts is None else (ts.version_acked, ts.last_error)
            names = [str(n) for n in a]  # type: ignore[attr-defined]
            request = Request(type_url, nonce, subscribe=names, error="bad" if c else None) if delta else \
                Request(type_url, nonce, resource_names=names, error="bad" if c else None)
            notes = stream.receive(request, now=0.0)
            stale = bool(nonce) and (ts is None or nonce != ts.nonce_sent)
            if stale and not delta:
                assert [n.__class__.__name__ for n in notes] == ["Ignored"]
                assert ts is None or (ts.version_acked, ts.last_error) == before


@settings(max_examples=100, deadline=None)
@given(present=st.sets(st.sampled_from("abcdefgh")), names=st.sets(st.sampled_from("abcdefghij")))
def test_a_subscriptions_version_covers_exactly_what_it_names(present: set[str], names: set[str]) -> None:
    """Whichever side is smaller is walked; the result is the content version of the named
    resources present, and the view's own version when they are all of it."""
    cache = ResourceCache()
    cache.set_resources(EXTENSION_CONFIG, {n: rbac_filter(n, f"/{n}") for n in present})
    view = cache.view("node", EXTENSION_CONFIG)
    named = named_resources(view, names)
    assert set(named) == present & names
    expected = content_version((n, view.resources[n].version) for n in present & names)
    assert subset_version(view, names) == expected
    if present <= names:
        assert subset_version(view, names) == view.version
