"""The xDS enforcer against the real Envoy binary, over the real xDS server.

The endpoint's address is 127.0.0.1 and its redirected port is the ingress
listener's own port, so a connection to the transparent listener matches
the endpoint's filter chain without a kernel redirect (the redirect branch
covers real pods). Only denials are exercised here: an allowed request
would go upstream to the same original destination, the listener itself.
Peers are told apart by source address (127.0.0.2 is identity 300).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from envoy.extensions.filters.http.rbac.v3.rbac_pb2 import RBAC

from flagella.endpoint.model import Endpoint
from flagella.endpoint.regeneration import Completion
from flagella.policy.api import HTTPRule
from flagella.policy.mapstate import Entry, Key, L7Policy, MapState, Verdict
from flagella.policy.resolver import EndpointPolicy
from flagella.proxy.enforcer import INGRESS_LISTENER, ProxyPorts, XdsEnforcer
from flagella.proxy.envoy import EnvoyProcess, bootstrap, free_port
from flagella.proxy.listeners import DENIED_BODY, filter_name, typed_extension_config
from flagella.proxy.rbac import peer_sets
from flagella.xds.cache import subset_version
from flagella.xds.server import XdsServer, XdsSettings
from flagella.xds.types import EXTENSION_CONFIG, LISTENER

_base_ids = itertools.count(42000 + os.getpid() % 1000 * 10)
TCP = 6
PEER, STRANGER = "127.0.0.2", "127.0.0.3"


def http_policy(port: int, *rules: HTTPRule, identity: int = 300) -> EndpointPolicy:
    ingress = MapState(True)
    ingress.add(Key(identity, TCP, port, port), Entry(Verdict.REDIRECT, L7Policy("http", frozenset(rules))))
    return EndpointPolicy(ingress, MapState(False))


def curl(port: int, path: str, source: str) -> tuple[int, str]:
    out = subprocess.run(
        ["curl", "-s", "-m", "5", "--interface", source, "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, timeout=10,
    )
    body, _, code = out.stdout.decode().rpartition("\n")
    return int(code or 0), body


def active_listeners(dump: dict[str, Any]) -> set[str]:
    return {
        d["name"]
        for c in dump["configs"]
        if c["@type"].endswith("ListenersConfigDump")
        for d in c.get("dynamic_listeners", [])
        if "active_state" in d
    }


async def wait(completion: Completion, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not completion.done and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


def test_enforcer_publishes_and_completes_on_ack(tmp_path: Path) -> None:
    async def main() -> None:
        server = XdsServer(XdsSettings(unix_socket=tmp_path / "xds.sock", debounce_quiet=0.01, debounce_max=0.1))
        await server.start()
        port = free_port()
        ipcache = {ipaddress.ip_network(f"{PEER}/32"): 300}
        enforcer = XdsEnforcer(
            server, asyncio.get_running_loop(), lambda: peer_sets(ipcache),
            ProxyPorts(ingress=port, egress=free_port()), envoy_wait_s=30, access_log=False,
        )
        ep = Endpoint(id=7, name="server", namespace="default", labels={}, ipv4=ipaddress.IPv4Address("127.0.0.1"))
        envoy = EnvoyProcess(bootstrap("node-a", tmp_path / "xds.sock", free_port()), next(_base_ids))
        try:
            # No HTTP redirects: complete at once, with or without an Envoy.
            assert enforcer.apply(ep, 1, EndpointPolicy(MapState(True), MapState(False))).done
            # Redirects and no Envoy: pending, never a success.
            first = enforcer.apply(ep, 2, http_policy(port, HTTPRule(method="GET", path="/public")))
            await asyncio.sleep(0.3)
            assert not first.done
            assert enforcer.sync_state() == "no Envoy connected to the xDS server"

            await asyncio.to_thread(envoy.start)
            await wait(first)
            assert first.done and first.error is None
            assert enforcer.sync_state() == ""
            status = {t.type_url: t for row in server.status() for t in row.types}
            assert status[LISTENER].version_acked == server.cache.view("node-a", LISTENER).version
            assert status[EXTENSION_CONFIG].version_acked == server.cache.view("node-a", EXTENSION_CONFIG).version

            dump = json.dumps(await asyncio.to_thread(envoy.config_dump))
            assert filter_name(7, False, port) in dump
            assert active_listeners(json.loads(dump)) == {INGRESS_LISTENER}
            assert await asyncio.to_thread(curl, port, "/private", PEER) == (403, DENIED_BODY)
            assert await asyncio.to_thread(curl, port, "/public", STRANGER) == (403, DENIED_BODY)
            lds_updates = (await asyncio.to_thread(envoy.stats, "listener_manager.lds.update_success"))

            # A peer change is one ECDS update: the listener is not rebuilt.
            ipcache[ipaddress.ip_network(f"{STRANGER}/32")] = 300
            enforcer.refresh_peers()
            await asyncio.sleep(0.5)
            assert enforcer.sync_state() == ""
            assert await asyncio.to_thread(envoy.stats, "listener_manager.lds.update_success") == lds_updates

            # A NACK (an RE2 Envoy rejects): the reason, and the previous config keeps enforcing.
            bad = enforcer.apply(ep, 3, http_policy(port, HTTPRule(path="(?=lookahead)")))
            await wait(bad)
            assert bad.done and bad.error is not None and bad.error.startswith("nack from node-a")
            assert "invalid perl operator" in bad.error
            assert await asyncio.to_thread(curl, port, "/private", PEER) == (403, DENIED_BODY)

            # Removal: the chain and its filter go away.
            enforcer.remove(ep)
            await asyncio.sleep(0.5)
            assert enforcer.sync_state() == ""
            assert active_listeners(await asyncio.to_thread(envoy.config_dump)) == set()
        finally:
            await asyncio.to_thread(envoy.stop)
            await server.stop()

    asyncio.run(main())


def test_a_sidecar_filter_on_the_same_server_does_not_hold_the_node_envoy(tmp_path: Path) -> None:
    """With Istio sidecars the server also holds their ECDS filters (the deny-all base),
    which the node Envoy never asks for. Its ECDS stream is sent, and ACKs, the version of
    what it asked for: the enforcer waits for exactly the filters it published."""

    async def main() -> None:
        server = XdsServer(XdsSettings(unix_socket=tmp_path / "xds.sock", debounce_quiet=0.01, debounce_max=0.1))
        await server.start()
        server.set_base(EXTENSION_CONFIG, {"flagella.rbac": typed_extension_config("flagella.rbac", RBAC())})
        port = free_port()
        enforcer = XdsEnforcer(
            server, asyncio.get_running_loop(), lambda: peer_sets({ipaddress.ip_network(f"{PEER}/32"): 300}),
            ProxyPorts(ingress=port, egress=free_port()), envoy_wait_s=30, access_log=False,
        )
        ep = Endpoint(id=7, name="server", namespace="default", labels={}, ipv4=ipaddress.IPv4Address("127.0.0.1"))
        envoy = EnvoyProcess(bootstrap("node-a", tmp_path / "xds.sock", free_port()), next(_base_ids))
        try:
            await asyncio.to_thread(envoy.start)
            applied = enforcer.apply(ep, 1, http_policy(port, HTTPRule(method="GET", path="/public")))
            await wait(applied)
            assert applied.done and applied.error is None
            assert enforcer.sync_state() == ""
            view = server.cache.view("node-a", EXTENSION_CONFIG)
            [ecds] = [t for row in server.status() for t in row.types if t.type_url == EXTENSION_CONFIG]
            assert set(view.resources) == {"flagella.rbac", filter_name(7, False, port)}
            assert ecds.version_acked == subset_version(view, {filter_name(7, False, port)}) != view.version
            assert await asyncio.to_thread(curl, port, "/private", PEER) == (403, DENIED_BODY)
        finally:
            await asyncio.to_thread(envoy.stop)
            await server.stop()

    asyncio.run(main())
