"""flagella.k8s against an HTTP double of the API server (tests/k8s/apiserver.py).

The real `kubernetes` client talks HTTP to the double; the sink records what the
agent would be told. Covers the initial list, watch events (relabel, add,
bookmark, delete), 410 Gone with a relist that finds what changed meanwhile,
CNP/CCNP status write-back, the PodCIDR options and the reserved-label rule.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flagella.errors import InputError, ResolutionError
from flagella.k8s import K8sSettings, NodeInfo, PodInfo, api_client, compose, detect_runtime
from flagella.k8s.controller import Controller
from flagella.k8s.translate import node_info, pod_info
from flagella.k8s.watch import PODS, WatchError
from flagella.policy.api import Policy
from tests.support.host import wait_until

from .apiserver import FakeApiServer, events, fixture

POD_PATH = "/api/v1/pods"
CNP_PATH = "/apis/cilium.io/v2/ciliumnetworkpolicies"


class RecordingSink:
    """Stands in for the agent: keeps what it was told, answers revisions."""

    def __init__(self) -> None:
        self.revision = 0
        self.realized = 1 << 30  # every revision counts as realized unless a test says not
        self.policies: dict[tuple[str, str, str], Policy] = {}
        self.namespaces: dict[str, dict[str, str]] = {}
        self.pods: dict[tuple[str, str], PodInfo] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.calls: list[tuple[str, Any]] = []

    def upsert_policy(self, policy: Policy) -> int:
        self.revision += 1
        self.policies[policy.key] = policy
        self.calls.append(("upsert_policy", policy.key))
        return self.revision

    def wait_realized(self, revision: int, timeout: float) -> bool:
        self.calls.append(("wait_realized", revision))
        if revision > self.realized:
            time.sleep(min(timeout, 0.05))
        return revision <= self.realized

    def delete_policy(self, kind: str, namespace: str, name: str) -> None:
        self.revision += 1
        self.policies.pop((kind, namespace, name), None)
        self.calls.append(("delete_policy", (kind, namespace, name)))

    def set_namespace_labels(self, namespace: str, labels: Mapping[str, str]) -> None:
        self.namespaces[namespace] = dict(labels)

    def upsert_pod(self, pod: PodInfo) -> None:
        self.pods[(pod.namespace, pod.name)] = pod
        self.calls.append(("upsert_pod", (pod.namespace, pod.name)))

    def delete_pod(self, namespace: str, name: str) -> None:
        self.pods.pop((namespace, name), None)
        self.calls.append(("delete_pod", (namespace, name)))

    def upsert_node(self, node: NodeInfo) -> None:
        self.nodes[node.name] = node

    def resync(self, kind: str, present: set[tuple[str, str]]) -> None:
        self.calls.append(("resync", (kind, frozenset(present))))

    def delete_node(self, name: str) -> None:
        self.nodes.pop(name, None)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as s:
        yield s


def _controller(server: FakeApiServer, sink: RecordingSink, **kw: Any) -> Controller:
    s = K8sSettings(node_name="node-a", **kw)
    return compose(sink, s, api_client(server.url, token="t0ken"))


def _watcher(ctl: Controller, path: str) -> Any:
    return next(w for w in ctl.watchers if w.resource.path == path)


def test_initial_sync_delivers_every_kind(server: FakeApiServer) -> None:
    sink = RecordingSink()
    _controller(server, sink).sync()
    assert sink.namespaces["production"] == {"kubernetes.io/metadata.name": "production", "env": "prod"}
    assert sink.nodes["node-a"] == NodeInfo("node-a", "10.244.1.0/24", "fd00:10:244:1::/64", ("172.18.0.2",))
    assert sink.nodes["node-c"].ipv6_pod_cidr == ""
    assert set(sink.policies) == {
        ("NetworkPolicy", "default", "allow-empire"),
        ("CiliumNetworkPolicy", "default", "rule1"),
        ("CiliumClusterwideNetworkPolicy", "", "deny-world-egress"),
    }
    # Only this node's pods, and not host-network ones.
    assert set(sink.pods) == {("default", "deathstar-6fb5694f48-5hmds"), ("default", "xwing-74c8f4c9d5-9qzx8")}
    deathstar = sink.pods[("default", "deathstar-6fb5694f48-5hmds")]
    assert deathstar.ips == ("10.244.1.12", "fd00:10:244:1::c")
    assert deathstar.labels["class"] == "deathstar"
    # The list requests carried the bearer token and, for pods, this node's field selector.
    pod_lists = [q for m, p, q in server.requests if p == POD_PATH]
    assert pod_lists[0]["fieldSelector"] == ["spec.nodeName=node-a"]


def test_pod_supplied_reserved_labels_are_dropped(server: FakeApiServer) -> None:
    """xwing labels itself with the agent's keys (another service account, kube-system, a
    namespace label): none of them reaches the agent, the real service account does."""
    sink = RecordingSink()
    _controller(server, sink).sync()
    xwing = sink.pods[("default", "xwing-74c8f4c9d5-9qzx8")]
    assert xwing.labels == {"org": "alliance", "class": "xwing"}
    assert xwing.service_account == "rebels"
    assert xwing.dropped == (
        "io.cilium.k8s.namespace.labels.trusted",
        "io.cilium.k8s.policy.serviceaccount",
        "io.kubernetes.pod.namespace",
    )


def test_cnp_status_is_written_back_per_node(server: FakeApiServer) -> None:
    sink = RecordingSink()
    _controller(server, sink).sync()
    by_path = {p: (ct, body) for p, ct, body in server.patches}
    ok_path = "/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies/rule1/status"
    ct, body = by_path[ok_path]
    assert ct == "application/merge-patch+json"
    entry = body["status"]["nodes"]["node-a"]
    assert entry["ok"] is True and entry["enforcing"] is True and "error" not in entry
    order = [k for c, k in sink.calls if c == "upsert_policy"]
    assert entry["localPolicyRevision"] == order.index(("CiliumNetworkPolicy", "default", "rule1")) + 1
    assert entry["annotations"] == {"io.cilium.k8s/owner": "team-empire",
                                    "kubectl.kubernetes.io/last-applied-configuration": "{}"}
    bad = by_path["/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies/broken/status"][1]
    bad_entry = bad["status"]["nodes"]["node-a"]
    assert bad_entry["ok"] is False and bad_entry["enforcing"] is False
    assert "spec.ingress[0].toPorts[0].ports[0].port: must be 0-65535" in bad_entry["error"]
    assert ("CiliumNetworkPolicy", "default", "broken") not in sink.policies  # nothing applied
    ccnp = by_path["/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies/deny-world-egress/status"][1]
    assert ccnp["status"]["nodes"]["node-a"]["annotations"] == {"policy.example.org/ticket": "SEC-101"}
    # NetworkPolicy has no status to write.
    assert not any("networkpolicies/allow-empire" in p for p in by_path)


def test_enforcing_waits_for_the_revision_to_be_realized(server: FakeApiServer) -> None:
    """Accepted but not yet realized on every endpoint: ``enforcing: false`` at first, then
    the status is written again with ``enforcing: true`` once the sink says it is."""
    sink = RecordingSink()
    sink.realized = 0
    ctl = _controller(server, sink, status_wait_s=0.2)
    ctl.sync()
    try:
        path = "/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies/rule1/status"
        entries = [b["status"]["nodes"]["node-a"] for p, _, b in server.patches if p == path]
        assert [(e["ok"], e["enforcing"]) for e in entries] == [(True, False)]
        revision = entries[0]["localPolicyRevision"]
        assert ("wait_realized", revision) in sink.calls
        sink.realized = revision
        wait_until(lambda: len([p for p, _, _ in server.patches if p == path]) == 2, timeout=10, what="the rewrite")
        last = [b for p, _, b in server.patches if p == path][-1]["status"]["nodes"]["node-a"]
        assert last["enforcing"] is True and last["localPolicyRevision"] == revision
    finally:
        ctl.stop()


def test_policy_the_agent_refuses_gets_an_error_status(server: FakeApiServer) -> None:
    class Refusing(RecordingSink):
        def upsert_policy(self, policy: Policy) -> int:
            if policy.name == "rule1":
                raise ResolutionError("conflicting L7 parsers on port 80: http and kafka")
            return super().upsert_policy(policy)

    sink = Refusing()
    ctl = _controller(server, sink)
    ctl.sync()
    entry = [b for p, _, b in server.patches if p.endswith("/rule1/status")][-1]["status"]["nodes"]["node-a"]
    assert entry["ok"] is False and "conflicting L7 parsers" in entry["error"]
    assert ("CiliumClusterwideNetworkPolicy", "", "deny-world-egress") in sink.policies


def test_status_revision_follows_the_sink(server: FakeApiServer) -> None:
    sink = RecordingSink()
    ctl = _controller(server, sink)
    ctl.sync()
    server.script[CNP_PATH] = [events("ciliumnetworkpolicies-watch.jsonl")]
    before = sink.revision
    _watcher(ctl, CNP_PATH).watch_once()
    rule1 = sink.policies[("CiliumNetworkPolicy", "default", "rule1")]
    ports = {p.port for r in rule1.rules for ing in r.ingress for pr in ing.ports for p in pr.ports}
    assert ports == {80, 443}
    last = [b for p, _, b in server.patches if p.endswith("/rule1/status")][-1]
    assert last["status"]["nodes"]["node-a"]["localPolicyRevision"] == before + 1
    assert ("delete_policy", ("CiliumNetworkPolicy", "default", "broken")) in sink.calls


def test_pod_watch_relabel_add_bookmark_delete(server: FakeApiServer) -> None:
    sink = RecordingSink()
    ctl = _controller(server, sink)
    ctl.sync()
    w = _watcher(ctl, POD_PATH)
    server.script[POD_PATH] = [events("pods-watch.jsonl"), []]
    sink.calls.clear()
    w.watch_once()
    assert sink.pods[("default", "deathstar-6fb5694f48-5hmds")].labels["class"] == "deathstar-v2"
    assert ("default", "xwing-74c8f4c9d5-abcde") in sink.pods
    assert ("default", "xwing-74c8f4c9d5-9qzx8") not in sink.pods
    assert [c for c, _ in sink.calls] == ["upsert_pod", "upsert_pod", "delete_pod"]
    assert w.resource_version == "1420"
    w.watch_once()
    first, second = server.watches(POD_PATH)
    assert first["resourceVersion"] == ["1410"] and first["allowWatchBookmarks"] == ["true"]
    assert second["resourceVersion"] == ["1420"]


def test_bookmark_moves_the_resource_version_without_delivering(server: FakeApiServer) -> None:
    sink = RecordingSink()
    ctl = _controller(server, sink)
    ctl.sync()
    w = _watcher(ctl, POD_PATH)
    bookmark = [e for e in events("pods-watch.jsonl") if e["type"] == "BOOKMARK"]
    server.script[POD_PATH] = [bookmark]
    sink.calls.clear()
    w.watch_once()
    assert sink.calls == [] and w.resource_version == "1418"


def test_410_gone_relists_and_reconciles(server: FakeApiServer) -> None:
    """The watch resumes from a compacted resourceVersion: the server answers 410; the
    watcher relists and delivers exactly what changed while it was away."""
    sink = RecordingSink()
    ctl = _controller(server, sink)
    ctl.sync()
    w = _watcher(ctl, POD_PATH)
    added = [e for e in events("pods-watch.jsonl") if e["type"] == "ADDED"]
    server.script[POD_PATH] = [added, "gone"]
    w.watch_once()
    assert ("default", "xwing-74c8f4c9d5-abcde") in sink.pods
    server.lists[POD_PATH] = fixture("pods-relist.json")
    sink.calls.clear()
    w.watch_once()
    assert w.relists == 1 and w.state == "watch" and w.resource_version == "1530"
    resyncs = [c for c in sink.calls if c[0] == "resync"]
    # (The double ignores the field selector: the other node's pods are listed too.)
    assert resyncs == [("resync", ("Pod", frozenset({
        ("default", "deathstar-6fb5694f48-5hmds"), ("default", "tiefighter-5d9f7c8b6-lk2wq"),
        ("kube-system", "kube-proxy-x7t2m")})))]
    assert sorted(c for c in sink.calls if c[0] != "resync") == sorted([
        ("delete_pod", ("default", "xwing-74c8f4c9d5-abcde")),
        ("delete_pod", ("default", "xwing-74c8f4c9d5-9qzx8")),
        ("upsert_pod", ("default", "deathstar-6fb5694f48-5hmds")),  # relabelled meanwhile
    ])
    assert sink.pods[("default", "deathstar-6fb5694f48-5hmds")].labels["class"] == "deathstar-v2"


def test_watch_error_other_than_gone_is_an_error(server: FakeApiServer) -> None:
    sink = RecordingSink()
    ctl = _controller(server, sink)
    ctl.sync()
    err = fixture("watch-gone.json")
    err["object"].update(code=500, reason="InternalError", message="etcdserver: request timed out")
    server.script[POD_PATH] = [[err]]
    with pytest.raises(WatchError, match="500.*etcdserver"):
        _watcher(ctl, POD_PATH).watch_once()


def test_namespace_labels_change_on_the_fly(server: FakeApiServer) -> None:
    sink = RecordingSink()
    ctl = _controller(server, sink)
    ctl.sync()
    server.script["/api/v1/namespaces"] = [events("namespaces-watch.jsonl")]
    _watcher(ctl, "/api/v1/namespaces").watch_once()
    assert sink.namespaces["production"]["tier"] == "gold"


def test_threads_follow_the_stream(server: FakeApiServer) -> None:
    """start() runs every watcher on its own thread until stop()."""
    sink = RecordingSink()
    ctl = _controller(server, sink)
    server.script[POD_PATH] = [events("pods-watch.jsonl")]
    ctl.start()
    try:
        import time
        for _ in range(200):
            if ("default", "xwing-74c8f4c9d5-abcde") in sink.pods and len(sink.policies) == 3:
                break
            time.sleep(0.05)
    finally:
        ctl.stop()
    assert ("default", "xwing-74c8f4c9d5-abcde") in sink.pods
    assert sink.pods[("default", "deathstar-6fb5694f48-5hmds")].labels["class"] == "deathstar-v2"


def test_require_pod_cidr_options(server: FakeApiServer) -> None:
    sink = RecordingSink()
    ctl = _controller(server, sink, require_ipv6_pod_cidr=True)
    ctl.sync()
    assert "node-c" not in sink.nodes and "node-a" in sink.nodes
    assert any("node node-c: spec.podCIDRs: no IPv6 PodCIDR" in m for m in ctl.skipped)


def test_ipv6_cluster_alloc_cidr() -> None:
    node = fixture("nodes.json")["items"][0]
    assert node_info(node, K8sSettings(ipv6_cluster_alloc_cidr="fd00:10:244::/48")).ipv6_pod_cidr
    with pytest.raises(InputError, match="outside --ipv6-cluster-alloc-cidr"):
        node_info(node, K8sSettings(ipv6_cluster_alloc_cidr="fd00:99::/48"))
    with pytest.raises(InputError, match="ipv6-cluster-alloc-cidr"):
        K8sSettings(ipv6_cluster_alloc_cidr="10.0.0.0/8").validate()
    with pytest.raises(InputError, match="no IPv4 PodCIDR"):
        node_info({"metadata": {"name": "n"}, "spec": {"podCIDRs": ["fd00::/64"]}},
                  K8sSettings(require_ipv4_pod_cidr=True))


def test_pod_with_bad_label_is_refused_naming_it() -> None:
    pod = fixture("pods.json")["items"][0]
    pod["metadata"]["labels"]["bad key!"] = "x"
    with pytest.raises(InputError, match="deathstar.*bad key!"):
        pod_info(pod)


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=12,
)
ip_like = st.ip_addresses().map(str) | st.text(alphabet="0123456789abcdef:.", max_size=12) | json_values
labels = st.dictionaries(st.sampled_from(["app", "io.cilium.k8s.x", "bad key", "a/b", ""]),
                         st.text(max_size=5) | json_values, max_size=3)


@settings(max_examples=500, deadline=None)
@given(
    meta=st.fixed_dictionaries({}, optional={"name": st.text(max_size=5) | json_values,
                                             "namespace": st.text(max_size=5) | json_values,
                                             "labels": labels | json_values}),
    spec=json_values | st.fixed_dictionaries({}, optional={"nodeName": json_values, "hostNetwork": json_values,
                                                         "serviceAccountName": json_values}),
    status=json_values | st.fixed_dictionaries({}, optional={
        "podIP": ip_like, "podIPs": st.lists(st.fixed_dictionaries({"ip": ip_like}), max_size=2) | json_values}),
)
def test_pod_translation_fuzz(meta: Any, spec: Any, status: Any) -> None:
    """Any pod shape yields a PodInfo or an InputError, never another exception."""
    with contextlib.suppress(InputError):
        info = pod_info({"metadata": meta, "spec": spec, "status": status})
        assert all(not k.startswith("io.cilium.k8s.") for k in info.labels)


@settings(max_examples=300, deadline=None)
@given(node=st.fixed_dictionaries({"metadata": st.fixed_dictionaries({"name": st.text(min_size=1, max_size=4)})},
                                  optional={"spec": json_values | st.fixed_dictionaries(
                                      {"podCIDRs": st.lists(ip_like | st.sampled_from(
                                          ["10.0.0.0/24", "fd00::/64", "10.0.0.1/24", "fd00::/129"]), max_size=3)}),
                                      "status": json_values}))
def test_node_translation_fuzz(node: Any) -> None:
    with contextlib.suppress(InputError):
        node_info(node, K8sSettings(require_ipv6_pod_cidr=True, ipv6_cluster_alloc_cidr="fd00::/48"))


# -- container runtime ------------------------------------------------------------


def _listen(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def test_runtime_detection_from_sockets(tmp_path: Path) -> None:
    assert detect_runtime(tmp_path) == "none"
    stale = _listen(tmp_path / "run/containerd/containerd.sock")
    stale.close()  # the file stays, nobody listens
    assert detect_runtime(tmp_path) == "none"
    with _listen(tmp_path / "var/run/crio/crio.sock"):
        assert detect_runtime(tmp_path) == "crio"
        with _listen(tmp_path / "var/run/docker.sock"):
            assert detect_runtime(tmp_path) == "crio"  # containerd, crio, docker in that order
            assert detect_runtime(tmp_path, forced="docker") == "docker"
    with _listen(tmp_path / "run/docker.sock"):
        assert detect_runtime(tmp_path) == "docker"
    with pytest.raises(InputError, match="container-runtime: 'rkt'"):
        detect_runtime(tmp_path, forced="rkt")


def test_compose_detects_or_forces_the_runtime(server: FakeApiServer, tmp_path: Path) -> None:
    api = api_client(server.url)
    with _listen(tmp_path / "run/containerd/containerd.sock"):
        assert compose(RecordingSink(), K8sSettings(), api, runtime_root=str(tmp_path)).runtime == "containerd"
        forced = K8sSettings(container_runtime="crio")
        assert compose(RecordingSink(), forced, api, runtime_root=str(tmp_path)).runtime == "crio"


def test_pods_resource_path() -> None:
    assert PODS.path == "/api/v1/pods"
