"""The kernel realization (DatapathEnforcer) over the in-memory datapath twin."""

from __future__ import annotations

from typing import Any

from flagella.datapath.entries import PolicyKey, PolicyValue, Verdict
from flagella.datapath.port import MemoryDatapath
from flagella.datapath.realizer import DatapathEnforcer
from flagella.endpoint import Endpoint
from flagella.policy.mapstate import Entry, Key, MapState
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
