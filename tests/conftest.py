"""Suite-wide rules.

With ``FLAGELLA_REQUIRE_ROOT_TESTS=1`` (set by ``.ci/run``), a test marked ``root``
that skips for want of its environment (root, bcc, the kernel) is a failure: on CI's
machine they are there, so such a skip means the real checks silently did not run.
Skips for other reasons (a case whose probes are all SCTP) stay skips.
"""

from __future__ import annotations

import os

import pytest

#: Words of the skip reasons that mean "this machine lacks what the test needs".
ENVIRONMENT_WORDS = ("root", "bcc", "not installed", "does not exist", "is missing")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("FLAGELLA_REQUIRE_ROOT_TESTS") == "1"
        and report.skipped
        and item.get_closest_marker("root") is not None
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(word in reason for word in ENVIRONMENT_WORDS):
            return
        report.outcome = "failed"
        report.longrepr = f"root test skipped where it must run: {reason}"
