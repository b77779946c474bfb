"""The CNI root tests reuse the system tests' real agent harness (`tests.system._support`)."""

from tests.system.conftest import make_agent, make_cluster, system_host

__all__ = ["make_agent", "make_cluster", "system_host"]
