"""A real ``flagella agent`` watching a cluster, with real pods and real traffic.

The API server is `tests.k8s.apiserver.FakeApiServer` (no kube-apiserver binary can be
had here), listening on loopback inside the agent's node namespace; the agent reads it
through ``--k8s-kubeconfig`` like a real cluster's. With ``--k8s-create-endpoints`` the
agent creates each pod of its node (a netns with a veth, as the CNI plugin would), with
the addresses of the pod's status. Objects change on the double while traffic runs:

* a CiliumNetworkPolicy applied through the API is enforced on TCP between pods, and its
  status (patched on the double) says ``enforcing`` at the revision the endpoints realized;
* a pod's label change flips the verdict, both ways;
* a bad CNP gets ``error`` in its status and nothing of it applies;
* deleting the CNP removes it; deleting a pod removes its endpoint and netns;
* a namespace's label change flips a NetworkPolicy namespaceSelector verdict; a pod that
  forges the namespace labels the agent owns gets none of them, and is denied;
* 410 Gone on the pods watch: the relist brings a relabel the watch never carried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.k8s import objects as k8s
from tests.k8s.apiserver import FakeApiServer
from tests.support.host import netns_names
from tests.system._support import (
    Agent,
    Cluster,
    Pod,
    assert_allowed,
    assert_denied,
    in_netns,
    namespace,
    sh,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

NODE = "node-sys"


class Scenario:
    """One agent watching the double, and the pods it created for the double's pods."""

    def __init__(self, agent: Agent, api: FakeApiServer, cluster: Cluster) -> None:
        self.agent, self.api, self.cluster = agent, api, cluster

    def pod(self, ns: str, name: str, n: int, labels: dict[str, str], expect: dict[str, str] | None = None,
            **kw: Any) -> Pod:
        """Apply the pod on the double; wait until its endpoint is ready with ``expect`` (these
        labels unless given)."""
        pod = Pod(name, ns, n)
        self.cluster.netns_seen.add(pod.netns)
        self.cluster.pods[pod.key] = pod
        self.api.apply(k8s.PODS, k8s.pod(ns, name, labels, NODE, ips=(pod.ipv4, pod.ipv6), **kw))
        pod.ep = self.endpoint(pod, lambda e: e["labels"] == (labels if expect is None else expect))
        assert pod.ep["ipv4"] == pod.ipv4 and pod.ep["netns"] == pod.netns, pod.ep
        return pod

    def endpoint(self, pod: Pod, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            eps = [e for e in self.agent.call("endpoint.list") if (e["namespace"], e["name"]) == (pod.namespace, pod.name)]
            return eps[0] if eps and eps[0]["state"] == "ready" and pred(eps[0]) else None

        found: dict[str, Any] = wait_until(seen, timeout=30, what=f"the endpoint of pod {pod.key}")
        return found

    def enforced(self, name: str, after: int = 0) -> dict[str, Any]:
        """This node's status entry of CNP ``name`` once one was written after ``after`` patches."""
        wait_until(lambda: len(self.api.status_patches(name)) > after, timeout=60, what=f"status of CNP {name}")
        return dict(self.api.status_patches(name)[-1]["status"]["nodes"][NODE])


@pytest.fixture
def scenario(make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]) -> Iterator[Scenario]:
    agent = make_agent("k8s", start=False)
    cluster = make_cluster(agent)
    if agent.node not in netns_names():
        sh("ip", "netns", "add", agent.node)
        sh("ip", "-n", agent.node, "link", "set", "lo", "up")
    with in_netns(agent.node):  # its socket listens on the node's loopback, where the agent is
        api = FakeApiServer(fixtures=False)
    with api:
        api.apply(k8s.NODES, k8s.node(NODE, "10.244.200.0/24", "fd00:10:244::c800/120"))
        config = k8s.kubeconfig(agent.workdir / "kubeconfig", api.url)
        agent.args = [
            "--k8s-kubeconfig", str(config), "--k8s-node-name", NODE,
            "--k8s-create-endpoints", "--k8s-require-ipv4-pod-cidr", "--container-runtime", "none",
        ]
        agent.start()
        yield Scenario(agent, api, cluster)
        # The double goes first: no relist may bring a pod back while the cluster is torn down.


def test_cnp_through_the_api_enforced_on_traffic(scenario: Scenario) -> None:
    s, agent = scenario, scenario.agent
    ns = namespace("kc")
    s.api.apply(k8s.NAMESPACES, k8s.namespace(ns, {}))
    server = s.pod(ns, "deathstar", 20, {"org": "empire", "class": "deathstar"})
    ship = s.pod(ns, "tiefighter", 21, {"org": "empire", "class": "tiefighter"}, service_account="pilots")
    assert "k8s:io.cilium.k8s.policy.serviceaccount=pilots" in agent.call(
        "endpoint.get", {"name": ship.key})["identity_labels"]
    s.cluster.servers.tcp_echo(server.netns, server.ipv4, 7400)
    s.cluster.servers.tcp_echo(server.netns, server.ipv6, 7400)
    s.cluster.servers.tcp_echo(server.netns, server.ipv4, 7401)
    assert_allowed(ship, server.ipv4, 7400, "no policy yet")

    spec = k8s.ingress_spec({"org": "empire", "class": "deathstar"}, {"matchLabels": {"org": "empire"}}, 7400)
    s.api.apply(k8s.CNPS, k8s.cnp(ns, "empire-only", spec, annotations={"owner": "team-empire"}))
    status = s.enforced("empire-only")
    assert status["ok"] is True and status["enforcing"] is True, status
    assert status["annotations"] == {"owner": "team-empire"}
    revision = status["localPolicyRevision"]
    assert revision == agent.call("status")["revision"]
    ep = agent.call("endpoint.get", {"name": server.key})
    assert ep["policy_revision"] >= revision and ep["policy"]["selected_rules"], ep
    assert_allowed(ship, server.ipv4, 7400, "org=empire")
    assert_allowed(ship, server.ipv6, 7400, "org=empire over IPv6")
    assert_denied(ship, server.ipv4, 7401, "a port the CNP does not name")

    # The pod's labels change on the fly: its identity changes and the verdict flips, both ways.
    identities = [ship.ep["identity"]]
    for org, check in (("alliance", assert_denied), ("empire", assert_allowed)):
        labels = {"org": org, "class": "tiefighter"}
        s.api.apply(k8s.PODS, k8s.pod(ns, "tiefighter", labels, NODE, ips=(ship.ipv4, ship.ipv6),
                                      service_account="pilots"))
        identities.append(s.endpoint(ship, lambda e, want=labels: e["labels"] == want)["identity"])
        check(ship, server.ipv4, 7400, f"after the pod's labels became org={org}")
    assert identities[1] != identities[0] and identities[2] == identities[0], identities

    # A bad CNP: error status naming the field; the policies in force are unchanged.
    before = agent.call("policy.get")
    bad = k8s.ingress_spec({"org": "empire"}, {"matchLabels": {"org": "alliance"}}, 7400)
    bad["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "99999"
    s.api.apply(k8s.CNPS, k8s.cnp(ns, "broken", bad))
    status = s.enforced("broken")
    assert status["ok"] is False and status["enforcing"] is False, status
    assert "ingress[0].toPorts[0].ports[0].port" in status["error"], status
    assert agent.call("policy.get") == before
    assert_denied(ship, server.ipv4, 7401, "still only what empire-only allows")

    # Deleting the CNP through the API removes it: nothing selects the deathstar any more.
    s.api.remove(k8s.CNPS, k8s.cnp(ns, "empire-only", {}))
    wait_until(lambda: not agent.call("policy.get")["policies"], timeout=30, what="the CNP to be deleted")
    wait_until(lambda: not agent.call("policy.wait", {})["waiting"], timeout=30, what="the endpoints to regenerate")
    assert_allowed(ship, server.ipv4, 7401, "no policy left")

    # Deleting the pod deletes its endpoint and its netns (the agent stands in for the CNI).
    s.api.remove(k8s.PODS, k8s.pod(ns, "tiefighter", {}, NODE))
    wait_until(lambda: ship.netns not in netns_names(), timeout=30, what="the pod's netns to go")
    assert all(e["name"] != "tiefighter" for e in agent.call("endpoint.list"))
    s.cluster.pods.pop(ship.key)


def test_namespace_labels_and_410_relist(scenario: Scenario) -> None:
    s, agent = scenario, scenario.agent
    ns, peer_ns = namespace("kd"), namespace("ke")
    s.api.apply(k8s.NAMESPACES, k8s.namespace(ns, {}))
    s.api.apply(k8s.NAMESPACES, k8s.namespace(peer_ns, {"team": "blue"}))
    s.api.apply(k8s.NETWORK_POLICIES, {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "db-from-blue", "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}],
                              "ports": [{"protocol": "TCP", "port": 7402}]}]},
    })
    db = s.pod(ns, "db", 30, {"app": "db"})
    ui = s.pod(peer_ns, "ui", 31, {"app": "ui"})
    s.cluster.servers.tcp_echo(db.netns, db.ipv4, 7402)
    wait_until(lambda: agent.call("policy.get")["policies"], timeout=30, what="the NetworkPolicy")
    wait_until(lambda: not agent.call("policy.wait", {})["waiting"], timeout=30, what="the endpoints to regenerate")
    assert_allowed(ui, db.ipv4, 7402, "namespace team=blue")
    for team, check in (("red", assert_denied), ("blue", assert_allowed)):
        s.api.apply(k8s.NAMESPACES, k8s.namespace(peer_ns, {"team": team}))
        s.endpoint(ui, lambda e, t=team: e["namespace_labels"].get("team") == t)
        check(ui, db.ipv4, 7402, f"after the namespace's label became team={team}")

    # An attacker's pod in the policy's own (unlabelled) namespace claims the blue namespace
    # through the labels the agent owns: they are dropped, its frames are dropped too.
    spy = s.pod(ns, "spy", 32, {"app": "spy", "io.cilium.k8s.namespace.labels.team": "blue",
                                 "io.kubernetes.pod.namespace": peer_ns}, expect={"app": "spy"})
    spy_labels = agent.call("endpoint.get", {"name": spy.key})["identity_labels"]
    assert f"k8s:io.kubernetes.pod.namespace={ns}" in spy_labels, spy_labels
    assert not any("namespace.labels.team" in label for label in spy_labels), spy_labels
    assert_denied(spy, db.ipv4, 7402, "forged namespace labels")
    assert_allowed(ui, db.ipv4, 7402, "the real blue namespace")

    # 410 Gone: the pods watch resumes from a compacted resourceVersion. The relabel that
    # happened meanwhile is only in the list; the relist brings it, and the verdict follows.
    s.api.apply(k8s.NAMESPACES, k8s.namespace(peer_ns, {"team": "red"}))
    s.endpoint(ui, lambda e: e["namespace_labels"].get("team") == "red")
    assert_denied(ui, db.ipv4, 7402, "team=red")
    policy_before = agent.call("policy.get")
    with s.api._lock:
        s.api.script[k8s.PODS] = ["gone"]
        body = s.api.lists[k8s.PODS]
        s.api.resource_version += 1
        moved = k8s.pod(ns, "db", {"app": "db-v2"}, NODE, ips=(db.ipv4, db.ipv6))
        moved["metadata"]["resourceVersion"] = body["metadata"]["resourceVersion"] = str(s.api.resource_version)
        body["items"] = [o for o in body["items"] if o["metadata"]["name"] != "db"] + [moved]
    s.endpoint(db, lambda e: e["labels"] == {"app": "db-v2"})
    assert agent.call("policy.get") == policy_before
    assert_allowed(ui, db.ipv4, 7402, "relisted as app=db-v2: no policy selects it any more")
    relabelled = agent.call("endpoint.get", {"name": db.key})
    assert (relabelled["id"], relabelled["ipv4"]) == (db.ep["id"], db.ipv4), "relabelled in place, not recreated"
