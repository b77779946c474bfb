"""Envoy's gRPC access log reaches the agent as L7 records (real Envoy, real gRPC)."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.accesslog.v3 import als_pb2_grpc

from flagella.policy.api import HTTPRule
from flagella.policy.mapstate import L7Policy
from flagella.proxy import listeners as L
from flagella.proxy.accesslog import AccessLogServicer, L7Record, format_l7, parse_log_name
from flagella.proxy.rbac import PeerSet, http_rbac
from tests.proxy.test_rbac_envoy import _curl, _envoy, upstream  # noqa: F401 (fixture)

IDENTITIES = {"127.0.0.2": 300, "127.0.0.3": 301, "127.0.0.1": 256}


class _Server:
    """A grpc.aio server with the access-log service, on its own loop in a thread."""

    def __init__(self, path: Path) -> None:
        self.records: list[L7Record] = []
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.servicer = AccessLogServicer(self.records.append, lambda ip: IDENTITIES.get(str(ip), 2))

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(f"unix://{self.path}")
        await self.server.start()

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        # The loop keeps running until the server has stopped, then stops itself.
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def als(tmp_path: Path) -> Iterator[_Server]:
    server = _Server(tmp_path / "als.sock")
    server.start()
    yield server
    server.stop()


def test_log_names_round_trip() -> None:
    assert parse_log_name(L.filter_name(7, True, 8080)) == (7, True)
    assert parse_log_name(L.filter_name(7, False, 80)) == (7, False)
    for bad in ("", "flagella/x/ingress/80", "flagella/1/sideways/80", "other/1/ingress/80"):
        assert parse_log_name(bad) is None


def test_requests_become_records(upstream: int, als: _Server) -> None:  # noqa: F811
    peers = {300: PeerSet((ipaddress.ip_network("127.0.0.2/32"),))}
    rbac = http_rbac([(300, L7Policy("http", frozenset({HTTPRule(method="GET", path="/public")})))], peers, False)
    envoy, port = _envoy(rbac, upstream, access_log=(L.filter_name(5, False, 80), str(als.path)))
    try:
        assert _curl(port, "/public", "127.0.0.2")[0] == 200
        assert _curl(port, "/private", "127.0.0.2", method="PUT")[0] == 403
        deadline = time.monotonic() + 15
        while len(als.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        envoy.stop()  # flushes the buffered log entries
    deadline = time.monotonic() + 5
    while len(als.records) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    forwarded, denied = sorted(als.records, key=lambda r: r.status)
    assert (forwarded.endpoint_id, forwarded.egress) == (5, False)
    assert (forwarded.method, forwarded.verdict, forwarded.status) == ("GET", "Forwarded", 200)
    assert forwarded.url.endswith("/public") and forwarded.src == "127.0.0.2"
    assert (forwarded.src_identity, forwarded.dst_identity) == (300, 256)
    assert (denied.method, denied.verdict, denied.status) == ("PUT", "Denied", 403)
    line = format_l7(denied)
    assert "identity 300->256" in line and "verdict Denied PUT" in line and line.endswith("=> 403")
    assert als.servicer.errors == 0
