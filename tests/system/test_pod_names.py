"""Pod network namespaces: one per endpoint, never shared, never taken from someone else.

The netns used to be ``<namespace>-<name>``, so pod ``b-c`` of namespace ``x`` and pod ``c`` of
namespace ``x-b`` were both ``x-b-c``: the second create took the first pod over (its address
replaced, one ifindex for two endpoints) and deleting either destroyed both. Here the two pods
are created through a real agent and must each keep their address and their traffic, and
survive the other's deletion. A create whose netns or host veth name already exists (an
operator's namespace, a veth, another agent's pod) fails with a clear error and leaves
that object as it was.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from flagella.datapath.port import pod_netns_name
from flagella.errors import InputError
from tests.system._support import (
    Agent,
    Cluster,
    addr4,
    assert_allowed,
    host_ifname_for,
    links,
    namespace,
    netns_names,
    sh,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

PORT = 7600


def _eth0_addresses(netns: str) -> set[str]:
    shown = json.loads(sh("ip", "-n", netns, "-j", "addr", "show", "dev", "eth0").stdout)
    return {a["local"] for a in shown[0]["addr_info"] if a.get("scope") == "global"}


def test_pods_whose_old_netns_names_collide_keep_their_own_pods(
    make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]
) -> None:
    agent = make_agent("nc")
    c = make_cluster(agent)
    ns = namespace("nc")
    first = c.create("b-c", ns, 110, {"app": "first"})  # was <ns>-b-c
    second = c.create("c", f"{ns}-b", 111, {"app": "second"})  # was <ns>-b-c too
    probe = c.create("probe", ns, 112, {"app": "probe"})
    assert first.netns != second.netns, (first.netns, second.netns)
    assert first.ep["ifindex"] != second.ep["ifindex"]
    assert f"{ns}-b-c" not in netns_names()
    assert _eth0_addresses(first.netns) == {first.ipv4, first.ipv6}
    assert _eth0_addresses(second.netns) == {second.ipv4, second.ipv6}
    c.servers.tcp_echo(first.netns, first.ipv4, PORT)
    c.servers.tcp_echo(second.netns, second.ipv4, PORT)
    assert_allowed(probe, first.ipv4, PORT, "the first pod")
    assert_allowed(probe, second.ipv4, PORT, "the second pod")

    c.delete(second)
    assert second.netns not in netns_names()
    assert first.netns in netns_names() and _eth0_addresses(first.netns) == {first.ipv4, first.ipv6}
    assert_allowed(probe, first.ipv4, PORT, "the first pod after the second was deleted")
    listed = {e["name"]: e for e in agent.cli_json("endpoint", "list")}
    assert listed["b-c"]["state"] == "ready" and "c" not in listed


def _create(agent: Agent, ns: str, name: str, n: int) -> None:
    agent.call(
        "endpoint.create",
        {"name": name, "namespace": ns, "labels": ["app=victim"], "ipv4": addr4(n), "ipv6": None},
    )


def test_create_refuses_a_netns_or_veth_it_did_not_make_and_touches_nothing(
    make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]
) -> None:
    agent = make_agent("nf")
    c = make_cluster(agent)
    ns = namespace("nf")

    # 1. An operator's namespace of the would-be name, with something in it.
    foreign = pod_netns_name(ns, "victim")
    sh("ip", "netns", "add", foreign)
    try:
        sh("ip", "-n", foreign, "link", "add", "marker0", "type", "veth", "peer", "name", "marker1")
        with pytest.raises(InputError, match=f"network namespace '{foreign}' already exists"):
            _create(agent, ns, "victim", 120)
        assert foreign in netns_names()
        assert sh("ip", "-n", foreign, "link", "show", "marker0", check=False).returncode == 0
        assert not any(link["ifname"] == host_ifname_for(foreign) for link in links(agent.node))
        assert agent.cli_json("endpoint", "list") == []
    finally:
        sh("ip", "netns", "del", foreign, check=False)

    # 2. A link of the would-be host veth name on the node.
    name2 = pod_netns_name(ns, "victim2")
    ifname = host_ifname_for(name2)
    sh("ip", "-n", agent.node, "link", "add", ifname, "type", "veth", "peer", "name", f"{ifname}p")
    try:
        with pytest.raises(InputError, match=f"host interface {ifname} already exists"):
            _create(agent, ns, "victim2", 121)
        assert name2 not in netns_names()
        found = [link for link in links(agent.node) if link["ifname"] == ifname]
        assert len(found) == 1 and not found[0].get("ifalias"), found  # as it was made
        assert agent.cli_json("endpoint", "list") == []
    finally:
        sh("ip", "-n", agent.node, "link", "del", ifname, check=False)

    # 3. Another agent's pod of the same Kubernetes namespace and name (pod netns are
    #    machine-wide): refused, and the first agent's pod keeps its traffic.
    mine = c.create("shared", ns, 122, {"app": "shared"})
    peer = c.create("peer", ns, 123, {"app": "peer"})
    c.servers.tcp_echo(mine.netns, mine.ipv4, PORT)
    other = make_agent("ng")
    with pytest.raises(InputError, match="already exists"):
        _create(other, ns, "shared", 124)
    assert other.cli_json("endpoint", "list") == []
    assert _eth0_addresses(mine.netns) == {mine.ipv4, mine.ipv6}
    assert_allowed(peer, mine.ipv4, PORT, "the first agent's pod after the second agent's attempt")
