"""Fixtures of the end-to-end conformance runner (see tests/support/e2e_harness.py).

`e2e_cluster` is module-scoped: one agent (own state dir, socket and bpf dir),
one world namespace and one set of pods per test module, all removed in
``finally`` whatever happens. A module declares ``FAMILY`` (4 or 6) and
``CASES`` (the cases it runs, for the world's addresses and ports).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import e2e_harness as h
from tests.support.e2e_plan import external_map, plan_case

#: Wall-clock seconds of each module's cluster, from setup to teardown.
MODULE_TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def e2e_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[h.Cluster]:
    h.prepare_host()
    family = int(getattr(request.module, "FAMILY", 4))
    cases = list(request.module.CASES)
    tag = "a" if family == 4 else "b"
    workdir = tmp_path_factory.mktemp(f"e2e-ipv{family}-")
    logs = workdir / "logs"
    logs.mkdir()
    start = time.monotonic()
    h.sweep_stale()
    agent = h.Agent(workdir, tag)
    world: h.World | None = None
    cluster: h.Cluster | None = None
    errors: list[str] = []
    try:
        if family == 4:
            externals = external_map(cases)
            serve: set[tuple[int, str]] = set()
            for case in cases:
                serve |= plan_case(case, externals).world_serve
            world = h.World(tag, sorted(externals.values()), serve, logs)
            world.create()
        agent.start()
        cluster = h.Cluster(agent, world, logs, family, tag)
        yield cluster
    finally:
        if cluster is not None:
            try:
                cluster.close()
            except Exception as exc:
                errors.append(str(exc))
        if world is not None:
            world.destroy()
        agent.stop()
        if cluster is not None:
            left = h.remove_pod_leftovers(cluster.netns_seen)
            if left:
                errors.append(f"the agent left pods behind (removed now): {', '.join(left)}")
            cluster.marker.unlink(missing_ok=True)
        MODULE_TIMES[f"IPv{family} ({request.module.__name__.rsplit('.', 1)[-1]})"] = time.monotonic() - start
        print(f"\ne2e logs: {logs} (agent log {agent.log_path})")
    if errors:
        pytest.fail("; ".join(errors))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not h.REPORTS:
        return
    tr = terminalreporter
    tr.section("flagella end-to-end conformance")
    for line in h.summary_lines(h.REPORTS):
        tr.write_line(line)
    for name, seconds in MODULE_TIMES.items():
        tr.write_line(f"module {name}: {seconds:.1f}s wall clock (agent start to teardown)")
    notes = [f"{r.id}: {n}" for r in h.REPORTS for n in r.info_notes]
    if notes:
        tr.write_line(f"loopback probes that differ from the table (informational, {len(notes)}):")
        for n in notes[:5]:
            tr.write_line(f"    {n}")
        if len(notes) > 5:
            tr.write_line(f"    ... {len(notes) - 5} more (all: self-traffic never leaves the pod, so no policy applies)")
    path = os.environ.get("FLAGELLA_E2E_REPORT")
    if path:
        h.write_report(Path(path), h.REPORTS)
        tr.write_line(f"JSON report: {path}")
