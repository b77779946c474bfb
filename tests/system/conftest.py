"""Fixtures of the agent's system tests (see `tests.system._support`).

* `system_host` (session): raises `HostUnavailable` unless root with bcc and the tools;
  turns netguard on (nothing
  a pod sends leaves the machine) and sweeps what dead runs of these tests left behind.
* `make_agent`: agents for one test, each closed (stopped, pins and state removed) at teardown.
* `module_agent`: one agent shared by the tests of a module.
* `make_cluster`: the pods of one test on an agent; teardown deletes them and fails the test
  if the agent left a netns or veth behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.system._support import (
    Agent,
    Cluster,
    prepare_host,
    sweep_stale,
)


@pytest.fixture(scope="session")
def system_host() -> Iterator[None]:
    prepare_host()
    sweep_stale()
    yield


def _start(agent: Agent) -> None:
    agent.start()


@pytest.fixture
def make_agent(system_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(tag: str, sync_interval_s: float = 1.0, start: bool = True, attach_mode: str = "auto") -> Agent:
        agent = Agent(tmp_path_factory.mktemp(f"agent-{tag}"), tag, sync_interval_s, attach_mode)
        agents.append(agent)
        if start:
            _start(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


@pytest.fixture(scope="module")
def module_agent(system_host: None, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    tag = str(getattr(request.module, "AGENT_TAG", "m"))
    agent = Agent(tmp_path_factory.mktemp(f"agent-{tag}"), tag, 1.0)
    try:
        _start(agent)
        yield agent
    finally:
        agent.close()


@pytest.fixture
def make_cluster(make_agent: Callable[..., Agent]) -> Iterator[Callable[[Agent], Cluster]]:
    # Depends on make_agent so that pods are torn down before their agents.
    clusters: list[Cluster] = []

    def make(agent: Agent) -> Cluster:
        c = Cluster(agent)
        clusters.append(c)
        return c

    yield make
    problems: list[str] = []
    for c in clusters:
        try:
            problems += c.close()
        except Exception as exc:
            problems.append(f"{exc.__class__.__name__}: {exc}")
    if problems:
        pytest.fail("cleanup: " + "; ".join(problems))
