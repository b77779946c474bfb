"""Drift repair of the attachment: programs removed behind the agent's back come back within one
sync interval, the flows they denied are denied again, and every reattachment is counted
(``status`` and ``flagella_attach_repairs_total``).

Two agents, one per attach mode. With clsact (``attach_mode: tc``) the tamper is the operator's
``tc filter del dev <host veth> {egress|ingress} pref 1``; with tcx (the default on this kernel)
it is removing the pinned link (``rm`` of the pin: the pin is the link's last reference) and
``bpftool link detach``. ``to_pod`` (the host veth's egress) enforces the server's ingress policy,
``from_pod`` (its ingress) the client's egress policy, so each tamper opens a flow that policy
denies: the intruder reaches the server, the client reaches a pod its egress policy excludes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.system._support import (
    Agent,
    Cluster,
    assert_allowed,
    assert_denied,
    cnp_ingress,
    namespace,
    sh,
    tamper_until_observed,
    tcp_connect,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

SYNC_S = 1.0
GAP_PROBE_TIMEOUT = 0.3  # well inside one sync interval
PORT = 7500
OTHER_PORT = 7501


def _client_egress(ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "sys-attach-egress", "namespace": ns},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "client"}},
            "egress": [
                {
                    "toEndpoints": [{"matchLabels": {"app": "server"}}],
                    "toPorts": [{"ports": [{"port": str(PORT), "protocol": "TCP"}]}],
                }
            ],
        },
    }


def _attach_repairs(agent: Agent) -> dict[str, int]:
    return dict(agent.call("status").get("attach_repairs", {}))


def _run(agent: Agent, c: Cluster, tag: str, tamper_to_pod: Callable[[dict[str, Any]], None],
         tamper_from_pod: Callable[[dict[str, Any]], None]) -> dict[str, int]:
    """Pods, policies, then both tampers; returns the repairs counted per program."""
    ns = namespace(tag)
    server = c.create("server", ns, 100, {"app": "server"})
    client = c.create("client", ns, 101, {"app": "client"})
    intruder = c.create("intruder", ns, 102, {"app": "intruder"})
    other = c.create("other", ns, 103, {"app": "other"})
    c.servers.tcp_echo(server.netns, server.ipv4, PORT)
    c.servers.tcp_echo(other.netns, other.ipv4, OTHER_PORT)
    c.import_policy(
        cnp_ingress("sys-attach-ingress", ns, {"app": "server"}, {"app": "client"}, [(PORT, "TCP")]),
        _client_egress(ns),
    )
    assert_allowed(client, server.ipv4, PORT)
    assert_denied(intruder, server.ipv4, PORT)
    assert_denied(client, other.ipv4, OTHER_PORT, "client egress to a pod its policy excludes")
    assert_allowed(intruder, other.ipv4, OTHER_PORT, "a pod without policy")
    assert _attach_repairs(agent) == {}

    counted = {"to_pod": 0, "from_pod": 0}

    def repaired(prog: str) -> Callable[[], bool]:
        return lambda: _attach_repairs(agent).get(prog, 0) > counted[prog]

    # 1. to_pod off the server's veth: its ingress policy is gone.
    n, took = tamper_until_observed(
        agent, SYNC_S, lambda: tamper_to_pod(server.ep), repaired("to_pod"),
        lambda: tcp_connect(intruder.netns, server.ipv4, PORT, GAP_PROBE_TIMEOUT) == "open",
        "to_pod on the server's veth",
    )
    counted["to_pod"] += n
    assert took <= SYNC_S + 1.0, f"to_pod reattached after {took:.2f}s with a {SYNC_S}s sync interval"
    assert_denied(intruder, server.ipv4, PORT, "after to_pod was reattached")
    assert_allowed(client, server.ipv4, PORT, "after to_pod was reattached")

    # 2. from_pod off the client's veth: its egress policy is gone.
    n, took = tamper_until_observed(
        agent, SYNC_S, lambda: tamper_from_pod(client.ep), repaired("from_pod"),
        lambda: tcp_connect(client.netns, other.ipv4, OTHER_PORT, GAP_PROBE_TIMEOUT) == "open",
        "from_pod on the client's veth",
    )
    counted["from_pod"] += n
    assert took <= SYNC_S + 1.0, f"from_pod reattached after {took:.2f}s"
    assert_denied(client, other.ipv4, OTHER_PORT, "after from_pod was reattached")
    assert_allowed(client, server.ipv4, PORT, "after from_pod was reattached")

    status = agent.cli_json("status")
    assert status["attach_repairs"] == counted, f"attach repairs {status['attach_repairs']}, expected {counted}"
    assert status["repairs"] == {}, f"map repairs {status['repairs']}: only the attachment was touched"
    text = agent.cli("status").stdout
    assert f"Attachment repairs: {sum(counted.values())}" in text, text
    for prog, count in counted.items():
        got = agent.metric("flagella_attach_repairs_total", program=prog)
        assert got == count, f"flagella_attach_repairs_total{{program={prog!r}}} = {got}, expected {count}"
    return counted


def test_clsact_filters_deleted_with_tc_are_reattached(
    make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]
) -> None:
    agent = make_agent("at", sync_interval_s=SYNC_S, attach_mode="tc")
    c = make_cluster(agent)

    def tc_del(hook: str) -> Callable[[dict[str, Any]], None]:
        return lambda ep: sh("tc", "filter", "del", "dev", ep["host_ifname"], hook, "pref", "1", netns=agent.node)

    _run(agent, c, "at", tc_del("egress"), tc_del("ingress"))
    assert not (agent.bpf_dir / "links").exists() or not any((agent.bpf_dir / "links").iterdir())


def test_tcx_links_removed_or_detached_are_reattached(
    make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]
) -> None:
    agent = make_agent("ax", sync_interval_s=SYNC_S)
    c = make_cluster(agent)

    def pin(ep: dict[str, Any], prog: str) -> str:
        return str(agent.bpf_dir / "links" / f"{ep['ifindex']}-{prog}")

    def remove_pin(ep: dict[str, Any]) -> None:
        sh("rm", pin(ep, "to_pod"))

    def bpftool_detach(ep: dict[str, Any]) -> None:
        link = json.loads(sh("bpftool", "-j", "link", "show", "pinned", pin(ep, "from_pod")).stdout)
        sh("bpftool", "link", "detach", "id", str(link["id"]))

    _run(agent, c, "ax", remove_pin, bpftool_detach)
    # tcx, not clsact: both links are pinned and tc shows no filter of ours.
    for pod in c.pods.values():
        for prog in ("from_pod", "to_pod"):
            assert (agent.bpf_dir / "links" / f"{pod.ep['ifindex']}-{prog}").exists(), (pod.key, prog)
        for hook in ("ingress", "egress"):
            shown = sh("tc", "filter", "show", "dev", pod.ep["host_ifname"], hook, netns=agent.node).stdout
            assert "flagella" not in shown, shown
