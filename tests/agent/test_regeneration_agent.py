"""The agent with a second enforcer that confirms late (as Envoy does): states, wait, CLI.

The agent serves its real unix socket from a thread; the second enforcer's
completions are resolved by the test, so nothing here depends on timing except
``--timeout``, which is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flagella.agent.controllers import Controller, run_controller
from flagella.cli._client import call
from flagella.clock import FakeClock
from flagella.endpoint import State
from tests.agent.inprocess import InProcessAgent as Agent
from tests.endpoint.test_regeneration import ScriptedEnforcer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "starwars"
L3L4 = str(EXAMPLES / "sw_l3_l4_policy.yaml")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path, enforcer=ScriptedEnforcer("xds"))
    a.cli("endpoint", "create", "deathstar", "--labels", "org=empire,class=deathstar")
    a.cli("endpoint", "create", "tiefighter", "--labels", "org=empire,class=tiefighter")
    yield a
    a.close()


def test_import_wait_times_out_naming_the_endpoint_an_enforcer_has_not_confirmed(agent: Agent) -> None:
    agent.envoy.mode = "hold"
    ds = agent.core.find("deathstar")
    kernel_before = {k: v for k, v in agent.dp.policy.items() if k.ep_id == ds.id}
    r = agent.cli("policy", "import", "--wait", "--timeout", "0.3", L3L4)
    assert r.exit_code == 1, r.output
    assert "not realized within 0.3s by default/deathstar" in r.output
    assert "waiting-for-enforcers: waiting for xds" in r.output
    assert "tiefighter" not in r.output  # not selected: realized at once
    listed = agent.cli("endpoint", "list")
    assert "waiting-for-enforcers (waiting for xds)" in listed.output
    got = json.loads(agent.cli("endpoint", "get", "deathstar").output)
    assert got["state"] == "waiting-for-enforcers" and got["state_reason"] == "waiting for xds"
    # The proxy stage comes first (§6.5): the kernel still holds the previous policy.
    assert {k: v for k, v in agent.dp.policy.items() if k.ep_id == ds.id} == kernel_before
    assert ds.policy_revision < agent.core.engine.revision
    agent.envoy.held[0].complete()
    w = call(agent.settings.socket_path, "policy.wait", {"revision": agent.core.engine.revision, "timeout": 30})
    assert w["lagging"] == [] and ds.state == State.READY
    assert {k: v for k, v in agent.dp.policy.items() if k.ep_id == ds.id} != kernel_before


def test_import_wait_returns_once_every_enforcer_confirmed(agent: Agent) -> None:
    r = agent.cli("policy", "import", "--wait", "--timeout", "30", L3L4)
    assert r.exit_code == 0, r.output
    revision = int(r.stdout.split()[-1])
    assert all(ep.policy_revision >= revision for ep in agent.core.endpoints.values())
    assert agent.envoy.applied[-1] == (agent.core.find("deathstar").id, revision)


def test_a_rejecting_enforcer_shows_not_ready_with_the_reason_and_counts_a_failure(agent: Agent) -> None:
    agent.envoy.mode = "fail"
    r = agent.cli("policy", "import", "--wait", "--timeout", "0.3", L3L4)
    assert r.exit_code == 1
    assert "not-ready: enforcer xds: NACK: listener rejected" in r.output
    status = call(agent.settings.socket_path, "status", {})
    assert status["regenerations"]["failure"] >= 1
    assert status["not_ready"] == [agent.core.find("deathstar").id]


def test_policy_wait_rejects_bad_arguments(agent: Agent) -> None:
    from flagella.errors import InputError

    with pytest.raises(InputError, match="timeout"):
        call(agent.settings.socket_path, "policy.wait", {"revision": 1, "timeout": "soon"})
    with pytest.raises(InputError, match="revision"):
        call(agent.settings.socket_path, "policy.wait", {"revision": "2"})


def test_metrics_count_regenerations_by_outcome_and_record_their_duration(agent: Agent) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from flagella.agent.metrics import AgentCollector

    agent.envoy.mode = "fail"
    agent.cli("policy", "import", "--wait", "--timeout", "0.3", L3L4)
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent.core, lambda: agent.server.controllers))
    text = generate_latest(registry).decode()
    assert 'flagella_endpoint_regenerations_total{outcome="failure"}' in text
    assert 'flagella_endpoint_regenerations_total{outcome="success"} 2.0' in text
    assert "flagella_endpoint_regeneration_time_stats_seconds_count" in text
    assert 'flagella_endpoint_state{endpoint_state="not-ready"} 1.0' in text


def test_controllers_run_on_the_clock_and_report_failures() -> None:
    clock = FakeClock()
    outcomes = [RuntimeError("map busy"), None]

    def flaky() -> None:
        err = outcomes.pop(0)
        if err is not None:
            raise err

    c = Controller("sync-maps", 10.0, flaky)

    async def scenario() -> None:
        task = asyncio.create_task(run_controller(c, clock, asyncio.Lock(), offload=False))
        for _ in range(5):
            await asyncio.sleep(0)
        assert c.runs == 0
        clock.advance(9.9)
        for _ in range(5):
            await asyncio.sleep(0)
        assert c.runs == 0
        clock.advance(0.1)
        for _ in range(5):
            await asyncio.sleep(0)
        assert (c.runs, c.consecutive_failures, c.last_error) == (1, 1, "map busy")
        clock.advance(10)
        for _ in range(5):
            await asyncio.sleep(0)
        assert (c.runs, c.failures, c.consecutive_failures, c.last_run) == (2, 1, 0, 20.0)
        task.cancel()

    asyncio.run(scenario())
