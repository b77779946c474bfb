"""The end-to-end conformance runner over IPv6, on a subset of the cases.

Pods get fd00:10:244::/64 addresses (10.244.1.10 -> fd00:10:244::1:10) and
every pod-to-pod probe goes over IPv6; probes to or from the world or the host
are skipped (the world is IPv4 TEST-NET only). The subset has no CIDR rules.
Steps whose policies name no port also get derived ICMPv6 echo probes (same
verdict as the TCP table), since the corpus has no pod-to-pod ICMP probe.
"""

from __future__ import annotations

import pytest

from tests.support.cases import load_cases
from tests.support.e2e_harness import REPORTS, CaseReport, Cluster, run_case
from tests.support.e2e_plan import plan_case, with_derived_icmp
from tests.support.host import SctpUnavailable

pytestmark = pytest.mark.root

FAMILY = 6
SUBSET = (
    "tcp-01-default-deny-ingress",
    "tcp-03-allow-from-same-ns-by-podselector",
    "tcp-10-podselector-and-namespaceselector",
    "tcp-19-egress-one-named-port",
    "udp-44-ports",
    "starwars-02-l3-l4-policy",
)
CASES = [with_derived_icmp(c) for c in load_cases() if c.id in SUBSET]


def test_subset_is_present() -> None:
    assert sorted(c.id for c in CASES) == sorted(SUBSET)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance_e2e_ipv6(e2e_cluster: Cluster, case) -> None:
    plan = plan_case(case, {}, family=FAMILY)
    probes = [p for s in plan.steps for p in s.probes]
    if all(p.action == "skip" for p in probes):
        report = CaseReport(plan.id, FAMILY, skipped=len(probes))
        REPORTS.append(report)
        if all(p.probe.protocol == "SCTP" for p in probes):
            raise SctpUnavailable(f"all {len(probes)} probes are SCTP")
        raise AssertionError(f"all {len(probes)} probes skipped: the IPv6 subset must be runnable")
    report = run_case(e2e_cluster, plan)
    assert report.ok, report.failure_text()
