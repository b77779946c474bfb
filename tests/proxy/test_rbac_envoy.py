"""The RBAC builder's output, enforced by the real Envoy binary on loopback.

A static listener stands in for one endpoint port's filter chain: the same
HTTP connection manager and RBAC filter the node proxy uses, with the
config inlined instead of delivered over ECDS. Peers are told apart by
source address (curl binds 127.0.0.2 or 127.0.0.3), as TPROXY keeps them.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.protobuf import json_format

from flagella.policy.api import HTTPRule
from flagella.policy.mapstate import L7Policy
from flagella.proxy import listeners as L
from flagella.proxy.envoy import EnvoyProcess, bootstrap, free_port
from flagella.proxy.rbac import PeerSet, http_rbac, peer_sets

CLIENT_A, CLIENT_B = "127.0.0.2", "127.0.0.3"
_base_ids = itertools.count(41000 + os.getpid() % 1000 * 10)


class _Echo(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = f"ok {self.command} {self.path} from {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _envoy(
    rbac: object, upstream_port: int, listen: str = "127.0.0.1", access_log: tuple[str, str] | None = None
) -> tuple[EnvoyProcess, int]:
    """An Envoy whose one listener runs ``rbac``; ``access_log`` = (log name, ALS socket path)."""
    port = free_port(listen)
    log = L.access_log_to_agent(access_log[0]) if access_log else None
    hcm = L.http_connection_manager("test", L.rbac_http_filter("flagella/test", None), "upstream", log)
    hcm.http_filters[0].typed_config.Pack(rbac)
    listener = {
        "name": "test",
        "address": {"socket_address": {"address": listen, "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": json_format.MessageToDict(L.packed(hcm), preserving_proto_field_name=True),
                    }
                ]
            }
        ],
    }
    cluster = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}}]}],
        },
    }
    config = bootstrap(
        "test", access_log[1] if access_log else "/nonexistent.sock", free_port(),
        static_resources={"listeners": [listener], "clusters": [cluster]}, ads=False,
    )
    envoy = EnvoyProcess(config, base_id=next(_base_ids))
    envoy.start()
    return envoy, port


def _curl(port: int, path: str, source: str, method: str = "GET", host: str = "", headers: tuple[str, ...] = (),
          http2: bool = False, listen: str = "127.0.0.1") -> tuple[int, str]:
    cmd = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5", "--interface", source, "-X", method]
    if http2:
        cmd.append("--http2-prior-knowledge")
    if host:
        cmd += ["-H", f"Host: {host}"]
    for h in headers:
        cmd += ["-H", h]
    # Bytes, not text mode: universal newlines would hide the body's \r.
    out = subprocess.run([*cmd, f"http://{listen}:{port}{path}"], capture_output=True, timeout=10).stdout.decode()
    body, _, code = out.rpartition("\n")
    return int(code), body


#: Both compiled forms: RBAC rules (linear) and the matcher API (IP trie).
FORMS = pytest.mark.parametrize("threshold", [1000, 0], ids=["rules", "matcher"])

PEERS = {300: PeerSet((ipaddress.ip_network(f"{CLIENT_A}/32"),)), 301: PeerSet((ipaddress.ip_network(f"{CLIENT_B}/32"),))}


def http(*rules: HTTPRule, wildcard: bool = False) -> L7Policy:
    return L7Policy("http", frozenset(rules), wildcard=wildcard)


@FORMS
def test_ingress_rules_per_peer_and_403_body(upstream: int, threshold: int) -> None:
    rbac = http_rbac(
        [
            (300, http(HTTPRule(method="GET", path="/v1/.*"))),
            (300, http(HTTPRule(method="PUT", path="/v1/exhaust-port", headers=("X-Has-Force: true",)))),
            (301, http(HTTPRule(path="/public"))),
        ],
        PEERS,
        egress=False,
        matcher_threshold=threshold,
    )
    envoy, port = _envoy(rbac, upstream)
    try:
        assert _curl(port, "/v1/request-landing", CLIENT_A)[0] == 200
        code, body = _curl(port, "/v1/request-landing", CLIENT_B)
        assert (code, body) == (403, "Access denied\r\n")
        assert _curl(port, "/public", CLIENT_B)[0] == 200
        # Full match: the query string is part of :path.
        assert _curl(port, "/public?x=1", CLIENT_B)[0] == 403
        assert _curl(port, "/v1/exhaust-port", CLIENT_A, method="PUT")[0] == 403
        assert _curl(port, "/v1/exhaust-port", CLIENT_A, method="PUT", headers=("X-Has-Force: true",))[0] == 200
        assert _curl(port, "/v1/exhaust-port", CLIENT_A, method="PUT", headers=("X-Has-Force: false",))[0] == 403
        # Cleartext HTTP/2 (what gRPC uses) is held to the same rules.
        assert _curl(port, "/v1/x", CLIENT_A, http2=True)[0] == 200
        assert _curl(port, "/v1/x", CLIENT_B, http2=True)[0] == 403
        # An unknown source (127.0.0.1 is in no identity's set) gets nothing.
        assert _curl(port, "/public", "127.0.0.1")[0] == 403
        # A denied request leaves the keep-alive connection usable: Envoy counts both.
        stats = envoy.stats("rbac")
        assert stats["http.test.rbac.flagella.allowed"] == 4
        assert stats["http.test.rbac.flagella.denied"] == 6
    finally:
        envoy.stop()


@FORMS
def test_wildcard_host_and_any_peer(upstream: int, threshold: int) -> None:
    rbac = http_rbac(
        [(0, http(HTTPRule(path="/public"))), (300, http(wildcard=True))],
        PEERS,
        egress=False,
        wildcard_identities=[301],
        matcher_threshold=threshold,
    )
    envoy, port = _envoy(rbac, upstream)
    try:
        assert _curl(port, "/anything", CLIENT_A, method="DELETE")[0] == 200
        assert _curl(port, "/anything", CLIENT_B)[0] == 200  # the host override
        assert _curl(port, "/public", "127.0.0.1")[0] == 200  # the any-peer rule
        assert _curl(port, "/private", "127.0.0.1")[0] == 403
    finally:
        envoy.stop()


@FORMS
def test_egress_matches_the_destination(upstream: int, threshold: int) -> None:
    listen = "127.0.0.4"
    peers = peer_sets({ipaddress.ip_network(f"{listen}/32"): 400, ipaddress.ip_network("127.0.0.0/8"): 401})
    rbac = http_rbac(
        [(400, http(HTTPRule(method="GET"))), (401, http(HTTPRule(path="/only-401")))], peers, egress=True,
        matcher_threshold=threshold,
    )
    envoy, port = _envoy(rbac, upstream, listen=listen)
    try:
        assert _curl(port, "/x", CLIENT_A, listen=listen)[0] == 200
        assert _curl(port, "/x", CLIENT_A, method="POST", listen=listen)[0] == 403
        # 401 owns 127/8 minus 127.0.0.4: its rule does not apply to this destination.
        assert _curl(port, "/only-401", CLIENT_A, method="POST", listen=listen)[0] == 403
    finally:
        envoy.stop()


@FORMS
def test_no_redirects_denies_everything(upstream: int, threshold: int) -> None:
    envoy, port = _envoy(http_rbac([], PEERS, egress=False, matcher_threshold=threshold), upstream)
    try:
        assert _curl(port, "/", CLIENT_A)[0] == 403
    finally:
        envoy.stop()
