"""Fixtures of the multi-node tests (see `tests.multinode._harness`).

* `mn_host` (session): root, bcc, the tools and etcd, netguard on; sweeps what dead
  runs of the system and multi-node tests left behind.
* `two_nodes` (module): two nodes with their agents and a shared etcd; torn down (and
  checked for leftovers) at the end of the module, also when a test failed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.multinode._harness import MultiNode
from tests.support.host import HostUnavailable
from tests.system._support import prepare_host, sweep_stale


@pytest.fixture(scope="session")
def mn_host() -> Iterator[None]:
    prepare_host()
    if shutil.which("etcd") is None:
        raise HostUnavailable("etcd (Debian package etcd-server) is not installed")
    sweep_stale()
    yield


@pytest.fixture(scope="module")
def two_nodes(mn_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNode]:
    mn = MultiNode(tmp_path_factory.mktemp("multinode"))
    try:
        mn.start()
        yield mn
    finally:
        problems = mn.close()
    assert not problems, problems


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The conformance runner's per-case lines for the multi-node cases that ran."""
    from tests.support import e2e_harness as h

    if h.REPORTS:
        terminalreporter.section("flagella conformance across two nodes")
        for line in h.summary_lines(h.REPORTS):
            terminalreporter.write_line(line)
