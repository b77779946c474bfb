"""The agent composes the node proxy: its xDS socket feeds the real Envoy.

The agent runs in-process over the in-memory datapath twin, with its real
unix sockets; pods get loopback addresses (pod CIDR 127.0.1.0/24), so
curl binding a pod's address is that pod as a peer. Envoy is the real
binary, started by the agent when the first HTTP redirect appears.

Requests: the kernel redirect into the transparent listener belongs to the
redirect branch; here a test listener (a node-scoped xDS resource, so the
agent's own publications keep it) runs the very RBAC filter the agent
publishes for deathstar's port 80 (same ECDS name) in front of an echo
server, so requests get the agent's real L7 verdicts.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2

from flagella.agent.metrics import AgentCollector
from flagella.agent.proxy import L7_DROP_REASON
from flagella.agent.settings import NetworkSettings, ProxySettings
from flagella.cli._client import stream
from flagella.datapath.entries import Verdict
from flagella.datapath.port import MemoryDatapath
from flagella.endpoint import State
from flagella.proxy import listeners as L
from flagella.proxy.envoy import RE2_MAX_PROGRAM_SIZE, free_port
from flagella.xds.types import CLUSTER, EXTENSION_CONFIG, LISTENER
from tests.agent.inprocess import InProcessAgent
from tests.proxy.test_enforcer_envoy import active_listeners
from tests.proxy.test_rbac_envoy import upstream  # noqa: F401 (fixture)
from tests.xds.envoy_harness import upstream_cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "starwars"
L3L4L7 = str(EXAMPLES / "sw_l3_l4_l7_policy.yaml")
_base_ids = itertools.count(43000 + os.getpid() % 1000 * 10)


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def proxy_settings() -> ProxySettings:
    return ProxySettings(
        enabled=True, ingress_port=free_port(), egress_port=free_port(),
        envoy_base_id=next(_base_ids), admin_port=free_port(), envoy_wait_s=20,
    )


def start_agent(tmp: Path, proxy: ProxySettings, dp: MemoryDatapath | None = None) -> InProcessAgent:
    return InProcessAgent(tmp, dp=dp, network=NetworkSettings(ipv4_cidr="127.0.1.0/24", ipv6_cidr=""), proxy=proxy)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[InProcessAgent]:
    a = start_agent(tmp_path, proxy_settings())
    try:
        for name, labels in (
            ("deathstar", "org=empire,class=deathstar"),
            ("tiefighter", "org=empire,class=tiefighter"),
            ("xwing", "org=alliance,class=xwing"),
        ):
            assert a.cli("endpoint", "create", name, "--labels", labels).exit_code == 0
        yield a
    finally:
        a.close()
        assert a.proxy is not None
        sup = a.proxy.supervisor
        if sup.process is not None:
            sup.process.stop()
        # An Envoy the supervisor no longer tracks (one a test held back or replaced) runs
        # under a keeper that ignores SIGTERM: stop every process of this test's Envoy dir.
        subprocess.run(["pkill", "-KILL", "-f", f"{tmp_path}/"], check=False)


def test_policy_import_wait_returns_after_envoy_acked(agent: InProcessAgent, upstream: int) -> None:  # noqa: F811
    assert agent.proxy is not None
    assert agent.proxy.supervisor.process is None  # no HTTP redirect yet: no Envoy
    r = agent.cli("policy", "import", "--wait", "--timeout", "60", L3L4L7)
    assert r.exit_code == 0, r.output
    revision = int(r.stdout.split()[-1])
    ds, tie, xwing = (agent.core.find(n) for n in ("deathstar", "tiefighter", "xwing"))
    assert ds.state == State.READY and ds.policy_revision >= revision
    # Started by the first redirect (ACKs may come before its admin says LIVE).
    envoy = wait_for(lambda: agent.proxy is not None and agent.proxy.supervisor.process, what="Envoy")
    assert envoy.running
    assert oct(os.stat(agent.settings.xds_socket_path).st_mode & 0o777) == "0o660"

    # `proxy status`: the node ACKed what the agent sent.
    rows = json.loads(agent.cli("proxy", "status", "--output", "json").output)
    types = {t["type_url"].rsplit(".", 1)[-1]: t for row in rows for t in row["types"]}
    for t in ("Cluster", "Listener", "TypedExtensionConfig"):
        assert types[t]["version_acked"] and types[t]["version_acked"] == types[t]["version_sent"], types[t]

    # Envoy's own view: the transparent listener and deathstar's RBAC from ECDS.
    name = L.filter_name(ds.id, False, 80)
    dump = envoy.config_dump()
    assert active_listeners(dump) == {"flagella-ingress"}
    assert name in json.dumps(dump)

    # Requests through the agent's RBAC for deathstar:80, with the monitor listening.
    port = test_listener(agent, name, upstream)
    lines: list[str] = []
    threading.Thread(target=monitor_l7, args=(agent, lines), daemon=True).start()
    time.sleep(0.3)
    tie_ip, xwing_ip = str(tie.ipv4), str(xwing.ipv4)
    code, body = curl_method(port, "/v1/request-landing", tie_ip, "POST")
    assert code == 200 and body.startswith("ok"), body
    assert curl_method(port, "/v1/exhaust-port", tie_ip, "PUT") == (403, L.DENIED_BODY)
    assert curl_method(port, "/v1/request-landing", xwing_ip, "POST") == (403, L.DENIED_BODY)
    wait_for(lambda: len(lines) >= 3, what="three l7 monitor lines")
    # (The destination is the test listener's 127.0.0.1 here, world; under TPROXY it is deathstar.)
    assert any(
        f"from {tie_ip}:" in ln and f"identity {tie.identity}->" in ln and "verdict Forwarded POST" in ln
        and "/v1/request-landing => 200" in ln for ln in lines
    ), lines
    assert any("verdict Denied PUT" in ln and "/v1/exhaust-port => 403" in ln for ln in lines), lines
    metric = {
        s.labels["rule"]: s.value for fam in agent.proxy.collect() for s in fam.samples
        if s.labels["proxy_type"] == "http"
    }
    assert metric["received"] >= 3 and metric["denied"] >= 2 and metric["forwarded"] >= 1
    assert metric["received"] == metric["denied"] + metric["forwarded"] and metric["parse_errors"] == 0
    # L7 drops join the kernel's drop totals: `bpf metrics list` and flagella_drop_count.
    rows = json.loads(agent.cli("bpf", "metrics", "list", "--output", "json").output)
    assert [r for r in rows if r["reason"] == L7_DROP_REASON] == [
        {"reason": L7_DROP_REASON, "direction": "INGRESS", "packets": metric["denied"], "bytes": 0}
    ], rows
    collector = AgentCollector(agent.core, lambda: [], agent.proxy.l7_drops)
    drops = {(s.labels["reason"], s.labels["direction"]): s.value
             for fam in collector.collect() if fam.name == "flagella_drop_count" for s in fam.samples}
    assert drops[(L7_DROP_REASON, "INGRESS")] == metric["denied"]

    # Envoy's admin listens on 127.0.0.1 only; its runtime carries the raised RE2 limit.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", agent.settings.proxy.admin_port), timeout=2).close()
    runtime = json.loads(envoy.admin("runtime"))["entries"]
    # Istio's 32768, above the policy parser's bound (1000): Envoy accepts every regex it accepts.
    assert runtime["re2.max_program_size.error_level"]["final_value"] == str(RE2_MAX_PROGRAM_SIZE)
    assert RE2_MAX_PROGRAM_SIZE >= 1000

    # An upstream that cannot be reached: Envoy logs no verdict of RBAC's, the record's
    # verdict is Error, and policy_l7_total counts it under parse_errors (spec 8.1).
    assert agent._loop is not None
    dead = upstream_cluster(free_port())
    agent._loop.call_soon_threadsafe(
        lambda: agent.proxy.server.update(CLUSTER, {"upstream": dead}, node=agent.proxy.node_id)  # type: ignore[union-attr]
    )
    wait_for(lambda: curl_method(port, "/v1/request-landing", tie_ip, "POST")[0] == 503, what="503 from Envoy")
    wait_for(lambda: agent.proxy is not None and agent.proxy.l7_counts["http", "parse_errors"] >= 1, what="an Error record")
    metric = {s.labels["rule"]: s.value for fam in agent.proxy.collect() for s in fam.samples
              if s.labels["proxy_type"] == "http"}
    assert metric["received"] == metric["denied"] + metric["forwarded"] + metric["parse_errors"]

    # An identity change reaches Envoy as ECDS only: relabel the tiefighter out of the empire.
    lds = envoy.stats("listener_manager.lds.update_success")
    assert agent.cli("endpoint", "labels", "tiefighter", "--set", "org=alliance").exit_code == 0
    wait_for(lambda: curl_method(port, "/v1/request-landing", str(tie.ipv4), "POST")[0] == 403,
             what="the relabelled tiefighter denied")
    assert envoy.stats("listener_manager.lds.update_success") == lds


def test_the_kernel_redirects_a_port_only_after_envoy_acked(agent: InProcessAgent) -> None:
    """Spec 6.5 through the enforcer seam: the xDS stage completes on Envoy's ACK, and the
    kernel stage writes deathstar's REDIRECT keys only after it. Envoy's start is held back
    until the policy has been waiting a while."""
    assert agent.proxy is not None
    gate = threading.Event()
    make = agent.proxy.supervisor.make

    def held() -> Any:
        assert gate.wait(60)
        return make()

    agent.proxy.supervisor.make = held
    dp = agent.dp
    assert isinstance(dp, MemoryDatapath)
    ds = agent.core.find("deathstar")

    def redirects() -> list[Any]:
        return [k for k, v in list(dp.policy.items()) if k.ep_id == ds.id and v.verdict == Verdict.REDIRECT]

    r = agent.cli("policy", "import", L3L4L7)
    assert r.exit_code == 0, r.output
    revision = int(r.stdout.split()[-1])
    wait_for(lambda: ds.state == State.WAITING_FOR_ENFORCERS, what="deathstar waiting for Envoy")
    for _ in range(20):  # a second with the policy handed over and no Envoy: nothing redirected
        assert redirects() == [] and ds.policy_revision < revision
        assert agent.proxy.enforcer.sync_state() == "no Envoy connected to the xDS server"
        time.sleep(0.05)
    gate.set()
    wait_for(lambda: ds.state == State.READY and ds.policy_revision >= revision, what="deathstar ready")
    assert {(k.port, dp.policy[k].proxy_port) for k in redirects()} == {(80, agent.settings.proxy.ingress_port)}
    # Ready means Envoy ACKed the listener and the RBAC config that the kernel now feeds.
    # (The API's answer: the CLI's captured stdout may interleave the agent thread's logs.)
    rows = agent.call("proxy.status")
    types = {t["type_url"].rsplit(".", 1)[-1]: t for row in rows for t in row["types"]}
    for t in ("Listener", "TypedExtensionConfig"):
        assert types[t]["version_acked"] == types[t]["version_sent"], types[t]


def test_envoy_crash_is_restarted_and_gets_the_whole_config(agent: InProcessAgent, upstream: int) -> None:  # noqa: F811
    assert agent.proxy is not None
    assert agent.cli("policy", "import", "--wait", "--timeout", "60", L3L4L7).exit_code == 0
    first = wait_for(lambda: agent.proxy is not None and agent.proxy.supervisor.process, what="Envoy")
    assert first.proc is not None
    os.killpg(first.proc.pid, signal.SIGKILL)
    second = wait_for(
        lambda: agent.proxy is not None and agent.proxy.supervisor.process is not first
        and agent.proxy.supervisor.process, timeout=30, what="a restarted Envoy",
    )
    assert agent.proxy.supervisor.restarts == 1
    wait_for(lambda: agent.proxy is not None and agent.proxy.enforcer.sync_state() == "", what="resync")
    ds = agent.core.find("deathstar")
    assert L.filter_name(ds.id, False, 80) in json.dumps(second.config_dump())
    assert active_listeners(second.config_dump()) == {"flagella-ingress"}


def test_agent_restart_keeps_l7_verdicts_and_resyncs(tmp_path: Path, agent: InProcessAgent,
                                                     upstream: int) -> None:  # noqa: F811
    assert agent.proxy is not None
    assert agent.cli("policy", "import", "--wait", "--timeout", "60", L3L4L7).exit_code == 0
    envoy = wait_for(lambda: agent.proxy is not None and agent.proxy.supervisor.process, what="Envoy")
    ds, tie = agent.core.find("deathstar"), agent.core.find("tiefighter")
    name, tie_ip = L.filter_name(ds.id, False, 80), str(tie.ipv4)
    port = test_listener(agent, name, upstream)
    assert curl_method(port, "/v1/exhaust-port", tie_ip, "PUT") == (403, L.DENIED_BODY)
    assert curl_method(port, "/v1/request-landing", tie_ip, "POST")[0] == 200
    before = ingress_listener_updated(envoy)
    agent.close()  # the agent is gone; Envoy keeps its last config and verdicts
    try:
        assert envoy.running
        assert curl_method(port, "/v1/request-landing", tie_ip, "POST")[0] == 200
        assert curl_method(port, "/v1/exhaust-port", tie_ip, "PUT") == (403, L.DENIED_BODY)

        again = start_agent(tmp_path, agent.settings.proxy, agent.dp)  # same state dir, sockets, pods
        try:
            assert again.proxy is not None
            wait_for(lambda: again.proxy is not None and again.proxy.adopted, what="the running Envoy adopted")
            assert again.proxy.supervisor.process is None  # no second Envoy
            port = test_listener(again, name, upstream)
            wait_for(lambda: again.proxy is not None and again.proxy.enforcer.sync_state() == "", what="resync")
            # Restore did not wait for an ACK nobody could send: no failed regeneration,
            # deathstar ready, and the adopted Envoy never lost the listener.
            assert again.core.pipeline.stats.outcomes.get("failure", 0) == 0
            assert again.core.find("deathstar").state == State.READY
            assert ingress_listener_updated(envoy) == before
            assert active_listeners(envoy.config_dump()) == {"flagella-ingress", "flagella-test"}
            assert curl_method(port, "/v1/exhaust-port", tie_ip, "PUT") == (403, L.DENIED_BODY)
            # A policy change after the restart applies.
            more = tmp_path / "exhaust.yaml"
            more.write_text(Path(L3L4L7).read_text().replace(
                "path: /v1/request-landing", "path: /v1/request-landing\n        - method: PUT\n          path: /v1/exhaust-port"
            ))
            r = again.cli("policy", "import", "--wait", "--timeout", "60", str(more))
            assert r.exit_code == 0, r.output
            assert curl_method(port, "/v1/exhaust-port", tie_ip, "PUT")[0] == 200
            assert envoy.running  # the same Envoy throughout
        finally:
            again.close()
    finally:
        envoy.stop()


def ingress_listener_updated(envoy: Any) -> str:
    """When Envoy last (re)built the ingress listener: unchanged = never removed or replaced."""
    for c in envoy.config_dump()["configs"]:
        for d in c.get("dynamic_listeners", []):
            if d["name"] == "flagella-ingress":
                return str(d["active_state"]["last_updated"])
    raise AssertionError("no active flagella-ingress listener")


def test_listener(agent: InProcessAgent, filter_name: str, upstream_port: int) -> int:
    """A listener on 127.0.0.1 whose one chain runs the RBAC filter ``filter_name``
    (from ECDS, as the agent publishes it) in front of the echo server."""
    assert agent.proxy is not None
    port = free_port()
    hcm = L.http_connection_manager(
        "test", L.rbac_http_filter(filter_name, L.ads_config_source()), "upstream",
        L.access_log_to_agent(filter_name),
    )
    listener = listener_pb2.Listener(
        name="flagella-test",
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)),
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=L.packed(hcm))
        ])],
    )
    node, server = agent.proxy.node_id, agent.proxy.server
    loop = agent._loop
    assert loop is not None

    def add() -> None:
        server.update(CLUSTER, {"upstream": upstream_cluster(upstream_port)}, node=node)
        server.update(LISTENER, {"flagella-test": listener}, node=node)

    loop.call_soon_threadsafe(add)
    wait_for(lambda: curl_method(port, "/", "127.0.0.1", "GET")[0] in (200, 403), what="the test listener")
    assert EXTENSION_CONFIG  # the RBAC config is the agent's own ECDS resource
    return port


test_listener.__test__ = False  # type: ignore[attr-defined]


def curl_method(port: int, path: str, source: str, method: str) -> tuple[int, str]:
    import subprocess

    out = subprocess.run(
        ["curl", "-s", "-m", "5", "-X", method, "--interface", source, "-w", "\n%{http_code}",
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, timeout=10,
    )
    body, _, code = out.stdout.decode().rpartition("\n")
    return int(code or 0), body


def monitor_l7(agent: InProcessAgent, lines: list[str]) -> None:
    """What `flagella monitor --type l7` prints: the CLI's stream client and formatter."""
    from flagella.cli._commands import format_event

    for ev in stream(agent.settings.socket_path, "monitor", {"type": "l7"}):
        lines.append(format_event(ev))



def test_a_nack_shows_in_proxy_status_and_the_previous_config_keeps_enforcing(
    agent: InProcessAgent, upstream: int, tmp_path: Path  # noqa: F811
) -> None:
    """Envoy is started with a tiny RE2 program-size limit, so a path regex the policy
    parser accepts is one Envoy rejects: a real NACK of a real agent publication."""
    assert agent.proxy is not None
    make = agent.proxy.supervisor.make

    def strict_re2() -> Any:
        proc = make()
        proc.config["layered_runtime"]["layers"][0]["static_layer"]["re2.max_program_size.error_level"] = 100
        return proc

    agent.proxy.supervisor.make = strict_re2
    assert agent.cli("policy", "import", "--wait", "--timeout", "60", L3L4L7).exit_code == 0
    ds, tie = agent.core.find("deathstar"), agent.core.find("tiefighter")
    port = test_listener(agent, L.filter_name(ds.id, False, 80), upstream)
    tie_ip = str(tie.ipv4)
    assert curl_method(port, "/v1/request-landing", tie_ip, "POST")[0] == 200

    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(L3L4L7).read_text().replace(
        "path: /v1/request-landing", "path: /v1/(request-landing|[a-z]+-port/[0-9]{1,8}){1,9}"
    ))
    r = agent.cli("policy", "import", "--wait", "--timeout", "5", str(bad))
    assert r.exit_code == 1, r.output
    assert "not-ready" in r.output and "nack from flagella-node" in r.output, r.output
    got = json.loads(agent.cli("endpoint", "get", "deathstar").output)
    assert got["state"] == "not-ready" and "program size" in got["state_reason"].lower(), got
    rows = json.loads(agent.cli("proxy", "status", "--output", "json").output)
    ecds = [t for row in rows for t in row["types"] if t["type_url"].endswith("TypedExtensionConfig")]
    assert ecds and "program size" in ecds[0]["last_error"].lower(), ecds
    # Envoy keeps the config it had: the old rule still decides.
    assert curl_method(port, "/v1/request-landing", tie_ip, "POST")[0] == 200
    assert curl_method(port, "/v1/exhaust-port/1", tie_ip, "PUT") == (403, L.DENIED_BODY)
