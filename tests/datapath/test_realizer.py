"""The kernel realization (DatapathEnforcer) over the in-memory datapath twin."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flagella.datapath.entries import PolicyKey, PolicyValue, Verdict
from flagella.datapath.port import MemoryDatapath
from flagella.datapath.realizer import DatapathEnforcer
from flagella.endpoint import Endpoint
from flagella.policy.mapstate import Entry, Key, L7Policy, MapState
from flagella.policy.resolver import EndpointPolicy


def endpoint(ep_id: int = 1, ifindex: int = 100) -> Endpoint:
    return Endpoint(id=ep_id, name="a", namespace="default", labels={}, ifindex=ifindex, identity=300)


def allow_from(*peers: int, port: int = 80) -> EndpointPolicy:
    ingress = MapState(True)
    for peer in peers:
        ingress.add(Key(peer, 6, port, port), Entry(Verdict.ALLOW))
    return EndpointPolicy(ingress, MapState(False))


def test_apply_writes_the_policy_and_completes_at_once() -> None:
    dp = MemoryDatapath()
    enforcer = DatapathEnforcer(dp, 15001, 15002)
    ep = endpoint()
    completion = enforcer.apply(ep, 1, allow_from(500))
    assert completion.done and completion.error is None
    assert dp.policy == {PolicyKey(1, 500, False, 6, 80, 0): PolicyValue(Verdict.ALLOW)}
    row = dp.endpoints[100]
    assert row.enforce_ingress and not row.enforce_egress and row.identity == 300
    assert dp.generation == 1  # bumped after the write
    enforcer.apply(ep, 2, allow_from(501))
    assert list(dp.policy) == [PolicyKey(1, 501, False, 6, 80, 0)]


def test_a_failed_write_is_a_failed_regeneration_and_sync_repairs_to_the_wanted_state() -> None:
    class Broken(dict):  # type: ignore[type-arg]
        fail = True

        def update(self, *a: Any, **kw: Any) -> None:
            if self.fail:
                raise OSError("map full")
            super().update(*a, **kw)

    dp = MemoryDatapath()
    dp.policy = Broken()  # type: ignore[assignment]
    enforcer = DatapathEnforcer(dp, 15001, 15002)
    ep = endpoint()
    try:
        enforcer.apply(ep, 1, allow_from(500))
    except OSError:
        pass
    else:
        raise AssertionError("the write error must reach the pipeline")
    assert dp.generation == 1 and not enforcer.complete[1]
    dp.policy.fail = False  # type: ignore[attr-defined]
    assert enforcer.sync() == 2  # the entry and the row
    assert PolicyKey(1, 500, False, 6, 80, 0) in dp.policy and 100 in dp.endpoints


def test_sync_leaves_alone_an_endpoint_regenerated_after_its_dump() -> None:
    dp = MemoryDatapath()
    enforcer = DatapathEnforcer(dp, 15001, 15002)
    ep = endpoint()
    enforcer.apply(ep, 1, allow_from(500))

    class RacingRows(dict):  # type: ignore[type-arg]
        """Reading the endpoint rows (after the policy dump) lets a regeneration in."""

        def items(self) -> Any:
            enforcer.apply(ep, 2, allow_from(501))
            return super().items()

    dp.endpoints = RacingRows(dp.endpoints)  # type: ignore[assignment]
    assert enforcer.sync() == 0  # the dump says 500, but 501 is newer: not "repaired"
    assert list(dp.policy) == [PolicyKey(1, 501, False, 6, 80, 0)]


def test_remove_deletes_entries_nobody_remembers_writing() -> None:
    dp = MemoryDatapath()
    enforcer = DatapathEnforcer(dp, 15001, 15002)
    ep = endpoint()
    enforcer.apply(ep, 1, allow_from(500))
    dp.policy[PolicyKey(1, 777, True, 17, 53, 0)] = PolicyValue(Verdict.ALLOW)  # from before a crash
    enforcer.remove(ep)
    assert dp.policy == {} and dp.endpoints == {}
    assert enforcer.sync() == 0


# --- incremental realization: what the maps hold is what a full computation says ---------------

_PEERS = [0, 1, 2, 65, 129]  # 1, 65 and 129 share a MapState chunk; 0 is any peer
_KEYS = [
    Key(peer, proto, first, last, prec)
    for peer in _PEERS
    for proto, first, last in ((0, 0, 65535), (6, 80, 80), (6, 80, 83), (6, 82, 95), (17, 53, 53))
    for prec in (0, 3, -1)
]
_ENTRIES = [
    Entry(Verdict.ALLOW), Entry(Verdict.DENY), Entry(Verdict.PASS),
    Entry(Verdict.REDIRECT, L7Policy("http", wildcard=True)),
]


def _entry(key: Key, entry: Entry) -> Entry:
    """UDP keys redirect to Kafka (a parser the node proxy lacks: allowed at L3/L4)."""
    if entry.verdict == Verdict.REDIRECT and key.protocol == 17:
        return Entry(Verdict.REDIRECT, L7Policy("kafka", wildcard=True))
    return entry
_change = st.one_of(
    st.tuples(st.just("add"), st.booleans(), st.sampled_from(_KEYS), st.sampled_from(_ENTRIES)),
    st.tuples(
        st.just("replace"), st.booleans(), st.sampled_from(_PEERS),
        st.lists(st.tuples(st.sampled_from(_KEYS), st.sampled_from(_ENTRIES)), max_size=3),
    ),
    st.tuples(st.just("enforce"), st.booleans(), st.booleans()),
    # hand the enforcer: a copy (journaled), a fresh state (not journaled), or a copy whose
    # write fails half-way
    st.tuples(st.just("apply"), st.sampled_from(["copy", "fresh", "fail"])),
)


class _FailingPolicy(dict):  # type: ignore[type-arg]
    fail = False

    def update(self, *a: Any, **kw: Any) -> None:
        super().update(*a, **kw)
        if self.fail:
            self.fail = False
            raise OSError("map full")


@settings(max_examples=300, deadline=None)
@given(st.lists(_change, max_size=40))
def test_incremental_apply_writes_what_a_full_computation_wants(changes: list[Any]) -> None:
    dp = MemoryDatapath()
    dp.policy = _FailingPolicy()  # type: ignore[assignment]
    enforcer = DatapathEnforcer(dp, 15001, 15002)
    ep = endpoint()
    live = EndpointPolicy(MapState(True), MapState(False))
    for change in [*changes, ("apply", "copy")]:
        kind = change[0]
        if kind == "apply":
            policy = live.snapshot()
            if change[1] == "fresh":
                policy = EndpointPolicy(
                    MapState(policy.ingress.enforced, dict(policy.ingress.entries)),
                    MapState(policy.egress.enforced, dict(policy.egress.entries)),
                )
            dp.policy.fail = change[1] == "fail"  # type: ignore[attr-defined]
            try:
                enforcer.apply(ep, 1, policy)
            except OSError:
                continue
            want, row = enforcer.desired(ep, policy)
            assert dict(dp.policy) == want
            assert dp.endpoints[ep.ifindex] == row
            continue
        state = live.egress if change[1] else live.ingress
        if kind == "add":
            state.add(change[2], _entry(change[2], change[3]))
        elif kind == "replace":
            state.replace_identity(
                change[2], {k: _entry(k, e) for k, e in change[3] if k.identity == change[2]}
            )
        else:
            state.enforced = change[2]
