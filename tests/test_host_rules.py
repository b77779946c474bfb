"""The one place that decides what a missing host means (tests/conftest.py's hook)."""

from __future__ import annotations

import pytest

PROBES = '''
import pytest
from tests.support.host import HostUnavailable, SctpUnavailable

@pytest.fixture(scope="module")
def fx():
    raise HostUnavailable("needs frobnicator")

@pytest.mark.root
def test_fixture(fx): pass

@pytest.mark.root
def test_host(): raise HostUnavailable("needs iperf3")

@pytest.mark.root
def test_sctp(): raise SctpUnavailable("all SCTP")

@pytest.mark.root
def test_plain_skip(): pytest.skip("whatever")

def test_unmarked_skip(): pytest.skip("not a root test")
'''


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, required: str) -> pytest.RunResult:
    monkeypatch.setenv("FLAGELLA_REQUIRE_ROOT_TESTS", required)
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport  # noqa: F401\n")
    pytester.makeini("[pytest]\nmarkers =\n    root: needs root\n")
    pytester.makepyfile(test_probes=PROBES)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rsfE")


def test_without_the_requirement_a_missing_host_skips(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(pytester, monkeypatch, "0")
    result.assert_outcomes(skipped=5)
    result.stdout.fnmatch_lines(["*needs frobnicator*", "*needs iperf3*", "*SCTP is not built*"])


def test_with_the_requirement_only_sctp_and_unmarked_tests_skip(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(pytester, monkeypatch, "1")
    result.assert_outcomes(failed=2, errors=1, skipped=2)
    result.stdout.fnmatch_lines(["*FAILED*test_host*", "*FAILED*test_plain_skip*", "*ERROR*test_fixture*"])
