"""Every conformance case, every probe, at trace level (labels in, verdict out)."""

from __future__ import annotations

import pytest

from flagella.policy.api import parse_policy
from flagella.policy.trace import Tracer
from tests.support.cases import load_cases
from tests.support.trace_probe import query

CASES = load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_at_trace_level(case):
    failures = []
    for step in case.steps:
        policies = [parse_policy(doc) for doc in step.policies]
        tracer = Tracer(policies)
        for probe in step.probes:
            result = tracer.trace(query(case, probe, step))
            got = "allow" if result.allowed else "deny"
            if got != probe.expect:
                failures.append(f"step {step.number}: {probe.label}: expected {probe.expect}, got {got}\n{result.to_text()}")
    assert not failures, f"{len(failures)} probes disagree:\n" + "\n\n".join(failures[:5])


def test_the_corpus_is_there():
    """The conformance corpus lives in ../shared; a run that finds none must not pass."""
    assert len(CASES) >= 50, f"found {len(CASES)} conformance cases"
