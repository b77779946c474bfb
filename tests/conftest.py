"""Suite-wide rules: what a host that lacks something does to a test.

The host harness (`tests.support.host`) raises `HostUnavailable` when root, bcc, a
tool or netguard is missing, and `SctpUnavailable` for cases that are only SCTP
(not built into this kernel). This hook is the one place that decides what those
mean: `SctpUnavailable` is always a skip; `HostUnavailable` is a skip, or a failure
under ``FLAGELLA_REQUIRE_ROOT_TESTS=1`` (set by ``.ci/run``). Under that variable a
test marked ``root`` may not skip for any other reason either.
"""

from __future__ import annotations

import pytest

from tests.support.host import SctpUnavailable, outcome_of_unavailable, prepare, root_tests_required

pytest_plugins = ["pytester"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    decided = outcome_of_unavailable(call.excinfo.value) if call.excinfo is not None else None
    if decided is not None:
        verdict, message = decided
        report.outcome = verdict
        if verdict == "skipped":
            report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {message}")
        else:
            report.longrepr = message
        return
    if (
        root_tests_required()
        and report.skipped
        and item.get_closest_marker("root") is not None
        and not (call.excinfo is not None and call.excinfo.errisinstance(SctpUnavailable))
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"root test skipped where it must run: {reason}"


@pytest.fixture(scope="session")
def root_host() -> None:
    """Root, bcc and netguard on: the host every kernel test needs (`HostUnavailable` if not)."""
    prepare(bcc=True)
