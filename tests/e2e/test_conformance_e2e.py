"""Every conformance case with real traffic: pods in network namespaces, the agent, bcc tc.

For each case of ../shared/conformance: create (or reuse) the case's pods on
one agent, and for each step make the agent's policy set equal to
``policies_in_effect``, apply the step's label changes, then probe the whole
table in parallel (TCP connect, UDP echo, ICMP echo, HTTP requests, Kafka
produce/consume with a real client against a Tansu broker in the destination
pod, all L7 through the agent's node proxy) and compare with the expected
verdicts. SCTP probes are skipped (not built into this kernel); other L7 probes
are checked as their transport when that is an L3/L4 question (see
`tests.support.e2e_plan.plan_probe`); loopback probes are informational.

Addresses are moved onto the test's own (pods: 10.244.0.0/16, outside world:
TEST-NET) with the policies' CIDRs rewritten to match
(`tests.support.e2e_plan`). The per-case counts and timing are printed at the
end of the run; ``FLAGELLA_E2E_REPORT=path.json`` also writes them as JSON.
"""

from __future__ import annotations

import pytest

from tests.support.cases import load_cases
from tests.support.e2e_harness import REPORTS, CaseReport, Cluster, run_case
from tests.support.e2e_plan import external_map, plan_case
from tests.support.host import SctpUnavailable

pytestmark = pytest.mark.root

FAMILY = 4
CASES = load_cases()
EXTERNALS = external_map(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance_e2e(e2e_cluster: Cluster, case) -> None:
    plan = plan_case(case, EXTERNALS, family=FAMILY)
    probes = [p for s in plan.steps for p in s.probes]
    if all(p.action == "skip" for p in probes):
        report = CaseReport(plan.id, FAMILY, skipped=len(probes))
        for p in probes:
            report.skip_reasons[p.reason] += 1
        REPORTS.append(report)
        if all(p.probe.protocol == "SCTP" for p in probes):
            raise SctpUnavailable(f"all {len(probes)} probes are SCTP")
        raise AssertionError(f"all {len(probes)} probes skipped: {', '.join(sorted(report.skip_reasons))}")
    report = run_case(e2e_cluster, plan)
    assert report.ok, report.failure_text()
