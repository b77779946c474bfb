"""Two Flagella nodes on one machine with a real etcd: policy enforced across nodes.

Each node is a network namespace with its own agent and pods (`tests.multinode._harness`);
the nodes share etcd, through which each learns the other's pods (address -> identity) and
node IP (-> reserved:remote-node). Real TCP between pods of different nodes:

* a CiliumNetworkPolicy that admits only ``app=client`` pods is enforced cross-node, in
  both directions, allowed and denied; the other node's host is remote-node, not host;
* a pod created later on one node becomes reachable (or stays denied) by the other node's
  policy once its ipcache entry arrives;
* etcd outage: both agents keep enforcing from their cache, a new local pod still works
  (a brand-new label set is refused with a clear error, nothing left behind), and when
  etcd returns the nodes catch up with the pods created meanwhile;
* a node that dies leaves the other's ipcache when its lease expires.

The tests of this module share one pair of nodes and run in order.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.multinode._harness import (
    MultiNode,
    Node,
    Pod,
    assert_allowed,
    assert_denied,
    cnp,
    connect,
    from_endpoints,
)
from tests.support.host import netns_names, sh, wait_until
from tests.system._support import Servers

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

CLIENT = {"app": "client"}
SERVER_POLICY = cnp(
    "server",
    {"app": "server"},
    [
        from_endpoints(CLIENT, 80),
        {"fromEntities": ["remote-node"], "toPorts": [{"ports": [{"port": "81", "protocol": "TCP"}]}]},
    ],
)


def node_routes(node: Node) -> str:
    """The agent's gateway routes in a node namespace (``ip route``, protocol 205)."""
    return str(sh("ip", "-n", node.netns, "route", "show", "proto", "205").stdout)


@pytest.fixture(scope="module")
def pods(two_nodes: MultiNode) -> Iterator[dict[str, Pod]]:
    a, b = two_nodes.nodes
    out = {}
    for node, x in ((a, "a"), (b, "b")):
        out[f"client-{x}"] = two_nodes.create_pod(node, f"client-{x}", **CLIENT)
        out[f"other-{x}"] = two_nodes.create_pod(node, f"other-{x}", app="other")
        out[f"server-{x}"] = two_nodes.create_pod(node, f"server-{x}", app="server")
        two_nodes.import_policy(node, SERVER_POLICY)
    servers = Servers()
    try:
        for x in "ab":
            for port in (80, 81):
                servers.tcp_echo(out[f"server-{x}"].netns, out[f"server-{x}"].ipv4, port)
        two_nodes.wait_converged()
        yield out
    finally:
        servers.close()


def test_policy_selects_remote_pods_by_label_in_both_directions(two_nodes: MultiNode, pods: dict[str, Pod]) -> None:
    a, b = two_nodes.nodes
    # Each node knows the other's pods under their identities, and the other node's IP.
    assert a.remote_endpoints()[pods["client-b"].ipv4] == pods["client-b"].identity
    assert b.remote_endpoints()[pods["other-a"].ipv4] == pods["other-a"].identity
    assert b.cluster()["nodes"]["mna"] == {"ips": [a.ip], "pod_cidrs": [a.pod_cidr]}
    # Node discovery routes each node's pod CIDR via the other's node IP.
    assert f"{b.pod_cidr} via {b.ip}" in node_routes(a)
    assert f"{a.pod_cidr} via {a.ip}" in node_routes(b)
    # The same labels got the same identity on both nodes (one etcd allocator).
    assert pods["client-a"].identity == pods["client-b"].identity
    for src, dst in (("a", "b"), ("b", "a")):
        assert_allowed(pods[f"client-{src}"], pods[f"server-{dst}"], 80)
        assert_denied(pods[f"other-{src}"], pods[f"server-{dst}"], 80)
        # remote-node is the other node's host, not a pod: port 81 only
        assert_denied(pods[f"client-{src}"], pods[f"server-{dst}"], 81)


def test_the_other_node_is_remote_node_not_host_or_world(two_nodes: MultiNode, pods: dict[str, Pod]) -> None:
    a, b = two_nodes.nodes
    # From node A's own network namespace (its address 10.250.0.1) to a pod on B.
    assert_allowed(a.netns, pods["server-b"], 81)
    assert_denied(a.netns, pods["server-b"], 80)
    assert_allowed(b.netns, pods["server-a"], 81)
    assert_denied(b.netns, pods["server-a"], 80)


def test_a_pod_created_later_is_learned_by_the_other_node(two_nodes: MultiNode, pods: dict[str, Pod]) -> None:
    a, b = two_nodes.nodes
    late = two_nodes.create_pod(b, "late-client", **CLIENT)
    late_other = two_nodes.create_pod(b, "late-other", app="late-other")  # a label set new to the cluster
    wait_until(
        lambda: a.remote_endpoints().get(late_other.ipv4) == late_other.identity,
        15, what="node A to learn the late pods",
    )
    assert_allowed(late, pods["server-a"], 80)
    assert_denied(late_other, pods["server-a"], 80)
    # A deleted pod leaves the other node's ipcache.
    b.agent.call("endpoint.delete", {"name": f"{late_other.ep['namespace']}/late-other"})
    b.pods.pop("late-other")
    wait_until(lambda: late_other.ipv4 not in a.remote_endpoints(), 15, what="node A to forget late-other")


def test_etcd_outage_keeps_enforcing_and_catches_up(two_nodes: MultiNode, pods: dict[str, Pod]) -> None:
    a, b = two_nodes.nodes
    two_nodes.etcd.kill()
    try:
        for node in (a, b):
            wait_until(
                lambda n=node: n.controller("kvstore-sync")["consecutive_failures"] >= 2,
                15, what=f"{node.name} to notice the outage",
            )
        # Enforcement from the cache, across nodes.
        assert_allowed(pods["client-a"], pods["server-b"], 80)
        assert_denied(pods["other-a"], pods["server-b"], 80)
        assert_allowed(pods["client-b"], pods["server-a"], 80)
        assert_denied(pods["other-b"], pods["server-a"], 80)
        # A new local pod with a label set its node holds works locally.
        new_a = two_nodes.create_pod(a, "outage-a", **CLIENT)
        new_b = two_nodes.create_pod(b, "outage-b", **CLIENT)
        assert new_a.identity == pods["client-a"].identity
        assert_allowed(new_a, pods["server-a"], 80)
        # A label set nobody holds cannot get a cluster identity now: refused, nothing left.
        with pytest.raises(Exception, match="etcd unreachable"):
            two_nodes.create_pod(a, "outage-new", app="brand-new")
        a.pods.pop("outage-new")
        assert f"{two_nodes.nodes[0].pods['client-a'].netns.split('_')[0]}_outage-new" not in netns_names()
    finally:
        two_nodes.etcd.start()
    # Caught up: each node learns the pod the other created during the outage.
    wait_until(lambda: a.remote_endpoints().get(new_b.ipv4) == new_b.identity, 30, what="A to learn outage-b")
    wait_until(lambda: b.remote_endpoints().get(new_a.ipv4) == new_a.identity, 30, what="B to learn outage-a")
    assert_allowed(new_b, pods["server-a"], 80)
    assert_allowed(new_a, pods["server-b"], 80)
    # And new label sets are allocated again.
    fresh = two_nodes.create_pod(a, "after-outage", app="after")
    wait_until(lambda: b.remote_endpoints().get(fresh.ipv4) == fresh.identity, 15, what="B to learn after-outage")
    assert_denied(fresh, pods["server-b"], 80)
    for node in (a, b):
        assert node.controller("kvstore-sync")["consecutive_failures"] == 0


def test_a_dead_node_leaves_the_ipcache_when_its_lease_expires(two_nodes: MultiNode, pods: dict[str, Pod]) -> None:
    a, b = two_nodes.nodes
    assert connect(pods["client-b"], pods["server-a"], 80, 2.0) == "open"
    b.agent.kill9()
    # lease_ttl_s is 5: B's node record and pods vanish from etcd, then from A's ipcache.
    wait_until(lambda: "mnb" not in a.cluster()["nodes"], 30, what="A to drop node B")
    assert pods["client-b"].ipv4 not in a.remote_endpoints()
    wait_until(lambda: b.pod_cidr not in node_routes(a), 5, what="A to drop its route to B's pods")
    # B's pods are unknown now: world to A, which the policy does not admit.
    assert_denied(pods["client-b"], pods["server-a"], 80)
