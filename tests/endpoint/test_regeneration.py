"""The regeneration pipeline against in-memory enforcers that delay, fail or never complete.

Time is a FakeClock: timeouts and backoff pass when the test says so, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flagella.clock import FakeClock
from flagella.endpoint import Endpoint, State
from flagella.endpoint.regeneration import (
    Completion,
    Pipeline,
    RegenerationSettings,
)
from flagella.policy.mapstate import MapState
from flagella.policy.resolver import EndpointPolicy

SETTINGS = RegenerationSettings(completion_timeout_s=10, backoff_initial_s=1, backoff_max_s=4)


@dataclass
class ScriptedEnforcer:
    """An enforcer whose answers the test decides: ``mode`` is complete, hold
    (a completion the test resolves), fail, never or raise."""

    name: str
    mode: str = "complete"
    applied: list[tuple[int, int]] = field(default_factory=list)
    held: list[Completion] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)

    def apply(self, endpoint: Endpoint, revision: int, policy: EndpointPolicy) -> Completion:
        self.applied.append((endpoint.id, revision))
        if self.mode == "raise":
            raise RuntimeError("kernel said no")
        if self.mode == "fail":
            return Completion.failed("NACK: listener rejected")
        if self.mode == "complete":
            return Completion.completed()
        c = Completion()
        self.held.append(c)  # "hold" and "never": only the test can complete it
        return c

    def remove(self, endpoint: Endpoint) -> None:
        self.removed.append(endpoint.id)


def policy(enforced: bool = True) -> EndpointPolicy:
    return EndpointPolicy(MapState(enforced), MapState(False))


def endpoint(ep_id: int) -> Endpoint:
    ep = Endpoint(id=ep_id, name=f"ep{ep_id}", namespace="default", labels={})
    ep.set_state(State.WAITING_FOR_IDENTITY)
    return ep


async def settle() -> None:
    """Let every ready task run (the pipeline's workers) until nothing moves."""
    for _ in range(20):
        await asyncio.sleep(0)


def run(scenario: Callable[[Pipeline, FakeClock], Awaitable[None]], *enforcers: ScriptedEnforcer) -> Pipeline:
    clock = FakeClock()
    pipeline = Pipeline(enforcers, SETTINGS, clock, offload=False)

    async def main() -> None:
        pipeline.bind(asyncio.get_running_loop())
        await scenario(pipeline, clock)

    asyncio.run(main())
    return pipeline


def test_revision_advances_only_when_every_enforcer_completed() -> None:
    kernel, envoy = ScriptedEnforcer("datapath"), ScriptedEnforcer("xds", mode="hold")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 7, policy())
        await settle()
        assert kernel.applied == [(1, 7)] and envoy.applied == [(1, 7)]
        assert ep.state == State.WAITING_FOR_ENFORCERS and ep.state_reason == "waiting for xds"
        assert ep.policy_revision == 0
        assert [e.id for e in await p.wait_revision_async(7, timeout=0)] == [1]
        envoy.held[0].complete()
        await settle()
        assert ep.state == State.READY and ep.state_reason == ""
        assert ep.policy_revision == 7 and ep.enforcing_ingress
        assert await p.wait_revision_async(7, timeout=0) == []

    p = run(scenario, kernel, envoy)
    assert p.stats.outcomes == {"success": 1}


def test_a_completion_that_never_arrives_fails_visibly_and_is_retried_with_backoff() -> None:
    envoy = ScriptedEnforcer("xds", mode="never")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 3, policy())
        await settle()
        clock.advance(9.9)
        await settle()
        assert ep.state == State.WAITING_FOR_ENFORCERS
        clock.advance(0.1)  # the completion timeout passes
        await settle()
        assert ep.state == State.NOT_READY
        assert ep.state_reason == "enforcer xds: no completion within 10s"
        assert ep.policy_revision == 0 and p.stats.outcomes["failure"] == 1
        assert len(envoy.applied) == 1
        clock.advance(0.9)  # backoff is 1s after the first failure
        await settle()
        assert len(envoy.applied) == 1
        clock.advance(0.1)
        await settle()
        assert envoy.applied == [(1, 3), (1, 3)]  # retried, same request
        envoy.held[0].complete()  # the abandoned attempt answers late: ignored
        await settle()
        assert ep.policy_revision == 0 and ep.state == State.WAITING_FOR_ENFORCERS
        clock.advance(10)  # second failure: backoff doubles to 2s
        await settle()
        assert p.stats.outcomes["failure"] == 2
        clock.advance(1.9)
        await settle()
        assert len(envoy.applied) == 2
        envoy.mode = "complete"
        clock.advance(0.1)
        await settle()
        assert len(envoy.applied) == 3
        assert ep.state == State.READY and ep.policy_revision == 3

    run(scenario, envoy)


def test_a_rejected_or_raising_enforcer_makes_the_endpoint_not_ready_with_the_reason() -> None:
    kernel, envoy = ScriptedEnforcer("datapath", mode="raise"), ScriptedEnforcer("xds", mode="fail")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 2, policy())
        await settle()
        assert ep.state == State.NOT_READY
        assert "datapath: RuntimeError: kernel said no" in ep.state_reason
        assert "xds: NACK: listener rejected" in ep.state_reason
        assert ep.policy_revision == 0

    p = run(scenario, kernel, envoy)
    assert p.stats.outcomes == {"failure": 1}


def test_changes_during_a_regeneration_coalesce_into_one_more_run() -> None:
    envoy = ScriptedEnforcer("xds", mode="hold")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 1, policy())
        await settle()
        for revision in (2, 3, 4):
            p.request(ep, revision, policy())
        await settle()
        assert envoy.applied == [(1, 1)]  # one worker per endpoint: serial
        envoy.held[0].complete()
        await settle()
        assert ep.policy_revision == 1 and ep.state == State.WAITING_FOR_ENFORCERS
        assert envoy.applied == [(1, 1), (1, 4)]  # 2 and 3 were never applied
        envoy.held[1].complete()
        await settle()
        assert ep.policy_revision == 4 and ep.state == State.READY

    run(scenario, envoy)


def test_endpoints_regenerate_independently() -> None:
    envoy = ScriptedEnforcer("xds", mode="hold")
    a, b = endpoint(1), endpoint(2)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(a, 5, policy())
        p.request(b, 5, policy())
        await settle()
        assert sorted(envoy.applied) == [(1, 5), (2, 5)]  # b does not wait behind a
        envoy.held[1].complete()
        await settle()
        assert (a.policy_revision, b.policy_revision) == (0, 5)
        lagging = await p.wait_revision_async(5, timeout=0)
        assert [e.id for e in lagging] == [1]

    run(scenario, envoy)


def test_an_unaffected_endpoint_realizes_a_revision_with_its_latest_request() -> None:
    envoy = ScriptedEnforcer("xds", mode="hold")
    busy, idle = endpoint(1), endpoint(2)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(idle, 1, policy())
        p.request(busy, 1, policy())
        await settle()
        envoy.held[0].complete()
        await settle()
        assert idle.policy_revision == 1
        p.advance([idle, busy], 2)  # revision 2 changed neither endpoint
        await settle()
        assert idle.policy_revision == 2  # idle and realized: at once
        assert busy.policy_revision == 0  # its regeneration is still waiting
        envoy.held[1].complete()
        await settle()
        assert busy.policy_revision == 2

    run(scenario, envoy)


def test_wait_returns_when_realized_or_names_the_lagging_endpoints_at_the_timeout() -> None:
    envoy = ScriptedEnforcer("xds", mode="hold")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 9, policy())
        await settle()
        waiter = asyncio.ensure_future(p.wait_revision_async(9, timeout=30))
        await settle()
        assert not waiter.done()
        envoy.held[0].complete()
        await settle()
        assert waiter.done() and waiter.result() == []
        p.request(ep, 10, policy())
        await settle()
        waiter = asyncio.ensure_future(p.wait_revision_async(10, timeout=5))
        await settle()
        clock.advance(5)
        await settle()
        assert [e.id for e in waiter.result()] == [1]

    run(scenario, envoy)


def test_remove_stops_the_worker_and_every_enforcer_forgets_the_endpoint() -> None:
    kernel, envoy = ScriptedEnforcer("datapath"), ScriptedEnforcer("xds", mode="never")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 1, policy())
        await settle()
        await p.remove_async(ep)
        clock.advance(100)
        await settle()
        assert kernel.removed == [1] and envoy.removed == [1]
        assert len(kernel.applied) == 1  # no retry after removal
        assert p.lagging(1) == []

    p = run(scenario, kernel, envoy)
    assert p.stats.outcomes == {}


def test_the_duration_histogram_measures_until_the_last_completion() -> None:
    envoy = ScriptedEnforcer("xds", mode="hold")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 1, policy())
        await settle()
        clock.advance(3)
        envoy.held[0].complete()
        await settle()

    p = run(scenario, envoy)
    assert p.stats.duration_sum == pytest.approx(3)
    # buckets are cumulative: 3 s is above 2.5 s and within 5 s
    from flagella.endpoint.regeneration import DURATION_BUCKETS

    counts = dict(zip(DURATION_BUCKETS, p.stats.buckets, strict=False))
    assert counts[2.5] == 0 and counts[5.0] == 1 and p.stats.buckets[-1] == 1


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert [SETTINGS.backoff(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 4]


def test_a_completion_counts_once() -> None:
    c = Completion()
    seen: list[str | None] = []
    c.add_done_callback(lambda x: seen.append(x.error))
    c.fail("first")
    c.complete()
    c.add_done_callback(lambda x: seen.append(x.error))
    assert seen == ["first", "first"] and c.error == "first"


def test_waiting_for_settlement_ends_when_an_attempt_failed_visibly() -> None:
    envoy = ScriptedEnforcer("xds", mode="fail")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 1, policy())
        waiter = asyncio.ensure_future(p.wait_settled_async([1], timeout=30))
        await settle()
        assert waiter.done() and waiter.result() == []  # no need to wait out the timeout
        assert ep.state == State.NOT_READY and ep.policy_revision == 0

    run(scenario, envoy)

OPS = st.lists(
    st.one_of(
        st.just(("request",)),
        st.just(("complete",)),
        st.just(("fail",)),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 4.0, 10.0])),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_changes_never_realize_an_unconfirmed_revision_and_always_converge(ops: list[tuple]) -> None:
    envoy = ScriptedEnforcer("xds", mode="hold")
    ep = endpoint(1)
    confirmed: set[int] = set()  # revisions whose apply was completed successfully

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        revision = 0
        answered = 0  # completions the test has answered, oldest first

        def answer(ok: bool) -> None:
            nonlocal answered
            if answered < len(envoy.held):
                held = envoy.held[answered]
                if ok:
                    held.complete()
                    confirmed.add(envoy.applied[answered][1])
                else:
                    held.fail("NACK")
                answered += 1

        for op in ops:
            if op[0] == "request":
                revision += 1
                p.request(ep, revision, policy())
            elif op[0] == "complete":
                answer(True)
            elif op[0] == "fail":
                answer(False)
            else:
                clock.advance(op[1])
            await settle()
            assert ep.policy_revision == 0 or ep.policy_revision in confirmed
            revisions = [r for _, r in envoy.applied]
            assert revisions == sorted(revisions)  # never an older policy after a newer one
        # From here every enforcer answers: the newest request is realized.
        envoy.mode = "complete"
        while answered < len(envoy.held):
            answer(True)
        for _ in range(12):
            clock.advance(30)
            await settle()
        if revision:
            assert ep.policy_revision == revision and ep.state == State.READY

    run(scenario, envoy)


def staged(scenario: Callable[[Pipeline, FakeClock], Awaitable[None]], proxy: ScriptedEnforcer,
           kernel: ScriptedEnforcer) -> Pipeline:
    clock = FakeClock()
    pipeline = Pipeline([kernel], SETTINGS, clock, offload=False, first=[proxy])

    async def main() -> None:
        pipeline.bind(asyncio.get_running_loop())
        await scenario(pipeline, clock)

    asyncio.run(main())
    return pipeline


def test_kernel_applies_only_after_the_proxy_acked() -> None:
    """cilium-1.1 §6.5: the datapath redirects a port only after Envoy ACKed."""
    proxy, kernel = ScriptedEnforcer("xds", mode="hold"), ScriptedEnforcer("datapath")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 3, policy())
        await settle()
        assert proxy.applied == [(1, 3)]
        assert kernel.applied == []  # nothing written while Envoy has not ACKed
        assert ep.state == State.WAITING_FOR_ENFORCERS and ep.state_reason == "waiting for xds"
        proxy.held[0].complete()
        await settle()
        assert kernel.applied == [(1, 3)]
        assert ep.state == State.READY and ep.policy_revision == 3

    staged(scenario, proxy, kernel)


def test_a_proxy_that_never_acks_keeps_the_kernel_untouched() -> None:
    proxy, kernel = ScriptedEnforcer("xds", mode="never"), ScriptedEnforcer("datapath")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 3, policy())
        await settle()
        clock.advance(SETTINGS.completion_timeout_s + 0.1)
        await settle()
        assert kernel.applied == []
        assert ep.state == State.NOT_READY
        assert "xds: no completion within 10s" in ep.state_reason
        assert ep.policy_revision == 0
        # The retry after the backoff asks the proxy again, still not the kernel.
        clock.advance(SETTINGS.backoff_initial_s)
        await settle()
        assert proxy.applied == [(1, 3), (1, 3)] and kernel.applied == []

    staged(scenario, proxy, kernel)


def test_a_proxy_nack_leaves_the_kernel_at_its_previous_policy() -> None:
    proxy, kernel = ScriptedEnforcer("xds"), ScriptedEnforcer("datapath")
    ep = endpoint(1)

    async def scenario(p: Pipeline, clock: FakeClock) -> None:
        p.request(ep, 3, policy())
        await settle()
        assert kernel.applied == [(1, 3)] and ep.policy_revision == 3
        proxy.mode = "fail"
        p.request(ep, 4, policy())
        await settle()
        assert kernel.applied == [(1, 3)]
        assert ep.state == State.NOT_READY and "NACK: listener rejected" in ep.state_reason
        assert ep.policy_revision == 3

    staged(scenario, proxy, kernel)
