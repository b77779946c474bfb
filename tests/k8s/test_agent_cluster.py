"""The agent watching a cluster: real watchers and client, the API double, the datapath twin.

`InProcessAgent` runs the agent's server (socket, lock, controllers) over the
in-memory datapath; ``k8s`` settings make it start the `flagella.k8s` watchers
against `FakeApiServer`, with a kubeconfig as ``--k8s-kubeconfig`` gives it.
Objects change on the double while the agent runs (`FakeApiServer.apply`). The
same flows with real pods and traffic: tests/system/test_k8s_watchers.py.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagella.agent.settings import NetworkSettings, ProxySettings
from flagella.datapath.entries import PolicyKey
from flagella.endpoint import Endpoint
from flagella.k8s import K8sSettings
from tests.agent.inprocess import InProcessAgent
from tests.support.host import wait_until

from . import objects as k8s
from .apiserver import FakeApiServer

NODE = "node-t"
NS = "shop"


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(fixtures=False) as s:
        yield s


@pytest.fixture
def start_agent(tmp_path: Path, api: FakeApiServer) -> Iterator[Callable[..., InProcessAgent]]:
    agents: list[InProcessAgent] = []

    def start(*, restart: InProcessAgent | None = None, **k8s_settings: Any) -> InProcessAgent:
        """A new agent; with ``restart``, that one's successor (its state dir and pods)."""
        cfg = k8s.kubeconfig(tmp_path / "kubeconfig", api.url)
        settings = K8sSettings(kubeconfig=str(cfg), node_name=NODE, status_wait_s=10, **k8s_settings)
        state = Path(restart.settings.state_dir) if restart else tmp_path / f"agent{len(agents)}"
        agent = InProcessAgent(
            state, dp=restart.dp if restart else None, k8s=settings,
            network=NetworkSettings(ipv4_cidr="10.244.0.0/16", ipv6_cidr="fd00:10:244::/64"),
        )
        agents.append(agent)
        return agent

    yield start
    for a in agents:
        a.close()


def pod_endpoint(agent: InProcessAgent, name: str, ns: str = NS) -> Endpoint | None:
    return agent.core.find_pod(ns, name)


def wait_endpoint(
    agent: InProcessAgent, name: str, pred: Callable[[dict[str, Any]], bool] = lambda e: True, ns: str = NS
) -> Endpoint:
    """Wait until the endpoint of pod ``ns/name``, as the API shows it, satisfies ``pred``
    (through the API: under the agent's lock, never in the middle of a relabel)."""

    def seen() -> bool:
        if pod_endpoint(agent, name, ns) is None:
            return False
        return pred(agent.call("endpoint.get", {"name": f"{ns}/{name}"}))

    wait_until(seen, timeout=20, what=f"endpoint of pod {ns}/{name}")
    ep = pod_endpoint(agent, name, ns)
    assert ep is not None
    return ep


def ingress_allows(agent: InProcessAgent, dst: Endpoint, src: Endpoint, port: int) -> bool:
    """The twin's verdict for src -> dst:port/TCP, once the change in flight is done (a
    request waits for the lock) and the pipeline settled."""
    agent.call("status")
    assert agent.core.wait_idle(10) == []
    row = agent.dp.endpoints[dst.ifindex]
    if not row.enforce_ingress:
        return True
    value = agent.dp.policy.get(PolicyKey(dst.id, src.identity, False, 6, port))
    return value is not None and value.verdict == 1


def last_status(api: FakeApiServer, name: str) -> dict[str, Any]:
    patches = api.status_patches(name)
    assert patches, f"no status written for {name}"
    return dict(patches[-1]["status"]["nodes"][NODE])


def test_pods_labels_and_cnp_enforced_with_status(start_agent: Callable[..., InProcessAgent], api: FakeApiServer) -> None:
    api.apply(k8s.NODES, k8s.node(NODE, "10.244.7.0/24", "fd00:10:244::700/120"))
    api.apply(k8s.NAMESPACES, k8s.namespace(NS, {"env": "prod"}))
    api.apply(k8s.PODS, k8s.pod(NS, "web", {"app": "web"}, NODE))
    api.apply(k8s.PODS, k8s.pod(NS, "client", {"app": "client"}, NODE, service_account="buyer"))
    api.apply(k8s.PODS, k8s.pod(NS, "elsewhere", {"app": "client"}, "node-other"))
    agent = start_agent(create_endpoints=True)
    web, client = wait_endpoint(agent, "web"), wait_endpoint(agent, "client")
    # Addresses come from this node's PodCIDRs; labels, namespace and service account apply.
    assert web.ipv4 in ipaddress.ip_network("10.244.7.0/24") and web.ipv6 in ipaddress.ip_network("fd00:10:244::700/120")
    labels = {str(x) for x in agent.core.security_labels(client)}
    assert {"k8s:app=client", f"k8s:io.kubernetes.pod.namespace={NS}",
            "k8s:io.cilium.k8s.policy.serviceaccount=buyer"} <= labels
    assert agent.core.find_pod(NS, "elsewhere") is None  # another node's pod

    api.apply(k8s.CNPS, k8s.cnp(NS, "web-from-client", k8s.ingress_spec({"app": "web"}, {"matchLabels": {"app": "client"}}, 80),
                                annotations={"ticket": "SEC-7"}))
    wait_until(lambda: api.status_patches("web-from-client"), timeout=20, what="the CNP status")
    status = last_status(api, "web-from-client")
    assert status["ok"] is True and status["enforcing"] is True, status
    assert status["localPolicyRevision"] == agent.core.engine.revision
    assert status["annotations"] == {"ticket": "SEC-7"}
    assert web.policy_revision >= status["localPolicyRevision"]  # realized, not only accepted
    assert ingress_allows(agent, web, client, 80) and not ingress_allows(agent, web, client, 81)

    # A pod label change on the fly: the client's endpoint gets a new identity, denied.
    api.apply(k8s.PODS, k8s.pod(NS, "client", {"app": "intruder"}, NODE, service_account="buyer"))
    client = wait_endpoint(agent, "client", lambda e: e["labels"].get("app") == "intruder")
    assert not ingress_allows(agent, web, client, 80)

    # A refused CNP: error status naming the field, nothing of it applied.
    before = (agent.core.engine.revision, set(agent.core.engine.policies))
    bad = k8s.ingress_spec({"app": "web"}, {"matchLabels": {"app": "intruder"}}, 80)
    bad["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "70000"
    api.apply(k8s.CNPS, k8s.cnp(NS, "broken", bad))
    wait_until(lambda: api.status_patches("broken"), timeout=20, what="the broken CNP's status")
    status = last_status(api, "broken")
    assert status["ok"] is False and status["enforcing"] is False
    assert "ingress[0].toPorts[0].ports[0].port" in status["error"], status
    assert (agent.core.engine.revision, set(agent.core.engine.policies)) == before
    assert not ingress_allows(agent, web, client, 80)

    # Delete: the policy goes; web has no policy left, so everything is allowed again.
    api.remove(k8s.CNPS, k8s.cnp(NS, "web-from-client", {}))
    wait_until(lambda: ("CiliumNetworkPolicy", NS, "web-from-client") not in agent.core.engine.policies,
               timeout=20, what="the CNP to be deleted")
    assert ingress_allows(agent, web, client, 80)

    # The pod's deletion deletes the endpoint the agent created for it.
    api.remove(k8s.PODS, k8s.pod(NS, "client", {}, NODE))
    wait_until(lambda: pod_endpoint(agent, "client") is None, timeout=20, what="the client endpoint to go")


def test_what_the_cluster_deleted_while_the_agent_was_down_goes(
    start_agent: Callable[..., InProcessAgent], api: FakeApiServer
) -> None:
    """A restarted agent's first lists hold neither the CNP nor the pod deleted meanwhile:
    the agent deletes both; a policy imported with the CLI stays."""
    api.apply(k8s.PODS, k8s.pod(NS, "web", {"app": "web"}, NODE))
    api.apply(k8s.PODS, k8s.pod(NS, "old", {"app": "old"}, NODE))
    api.apply(k8s.CNPS, k8s.cnp(NS, "web-from-client", k8s.ingress_spec({"app": "web"}, {"matchLabels": {"app": "client"}}, 80)))
    first = start_agent(create_endpoints=True)
    wait_endpoint(first, "web")
    wait_endpoint(first, "old")
    wait_until(lambda: api.status_patches("web-from-client"), timeout=20, what="the CNP")
    cli_policy = k8s.cnp(NS, "from-the-cli", k8s.ingress_spec({"app": "old"}, {"matchLabels": {"app": "web"}}, 81))
    first.call("policy.import", {"documents": [cli_policy]})
    first.close()
    api.remove(k8s.CNPS, k8s.cnp(NS, "web-from-client", {}))
    api.remove(k8s.PODS, k8s.pod(NS, "old", {}, NODE))
    with api._lock:  # the watch events are compacted away: only the lists tell
        for path in api.script:
            api.script[path].clear()

    second = start_agent(restart=first, create_endpoints=True)
    wait_until(lambda: ("CiliumNetworkPolicy", NS, "web-from-client") not in second.core.engine.policies,
               timeout=20, what="the CNP deleted meanwhile to go")
    wait_until(lambda: pod_endpoint(second, "old") is None, timeout=20, what="the pod deleted meanwhile to go")
    assert pod_endpoint(second, "web") is not None
    assert ("CiliumNetworkPolicy", NS, "from-the-cli") in second.core.engine.policies


def test_namespace_labels_flip_a_namespace_selector(start_agent: Callable[..., InProcessAgent], api: FakeApiServer) -> None:
    api.apply(k8s.NAMESPACES, k8s.namespace("front", {"team": "blue"}))
    api.apply(k8s.NAMESPACES, k8s.namespace(NS, {}))
    api.apply(k8s.PODS, k8s.pod(NS, "db", {"app": "db"}, NODE))
    api.apply(k8s.PODS, k8s.pod("front", "ui", {"app": "ui"}, NODE))
    api.apply(k8s.NETWORK_POLICIES, {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "db-from-blue", "namespace": NS},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}],
                              "ports": [{"protocol": "TCP", "port": 5432}]}]},
    })
    agent = start_agent(create_endpoints=True)
    db, ui = wait_endpoint(agent, "db"), wait_endpoint(agent, "ui", lambda e: e["namespace_labels"].get("team") == "blue", "front")
    wait_until(lambda: agent.core.engine.policies, timeout=20, what="the NetworkPolicy")
    assert ingress_allows(agent, db, ui, 5432)
    api.apply(k8s.NAMESPACES, k8s.namespace("front", {"team": "red"}))
    ui = wait_endpoint(agent, "ui", lambda e: e["namespace_labels"].get("team") == "red", "front")
    assert not ingress_allows(agent, db, ui, 5432)
    api.apply(k8s.NAMESPACES, k8s.namespace("front", {"team": "blue"}))
    ui = wait_endpoint(agent, "ui", lambda e: e["namespace_labels"].get("team") == "blue", "front")
    assert ingress_allows(agent, db, ui, 5432)
    # A key the namespace loses is unset (the CLI's --unset), not kept.
    api.apply(k8s.NAMESPACES, k8s.namespace("front", {}))
    ui = wait_endpoint(agent, "ui", lambda e: "team" not in e["namespace_labels"], "front")
    assert not ingress_allows(agent, db, ui, 5432)


def test_cni_created_endpoint_picks_up_the_pods_labels(start_agent: Callable[..., InProcessAgent], api: FakeApiServer) -> None:
    """Without create_endpoints the endpoint comes from elsewhere (the CNI plugin, here the
    API with the pod's name): labels known before it exists apply at creation, later ones
    on the fly; the pod's deletion leaves the endpoint to its creator."""
    api.apply(k8s.PODS, k8s.pod(NS, "cart", {"app": "cart", "tier": "back"}, NODE, service_account="shop"))
    agent = start_agent()
    wait_until(lambda: (NS, "cart") in agent.core.known_pods, timeout=20, what="the pod to be seen")
    assert pod_endpoint(agent, "cart") is None
    ep = agent.call("endpoint.create", {"name": "cart", "namespace": NS})  # no labels given
    assert ep["labels"] == {"app": "cart", "tier": "back"} and ep["service_account"] == "shop"
    api.apply(k8s.PODS, k8s.pod(NS, "cart", {"app": "cart", "tier": "front"}, NODE, service_account="shop"))
    wait_endpoint(agent, "cart", lambda e: e["labels"].get("tier") == "front")
    api.remove(k8s.PODS, k8s.pod(NS, "cart", {}, NODE))
    wait_until(lambda: (NS, "cart") not in agent.core.known_pods, timeout=20, what="the pod to be forgotten")
    assert pod_endpoint(agent, "cart") is not None


def test_required_pod_cidr_holds_endpoints_until_the_node_has_it(
    start_agent: Callable[..., InProcessAgent], api: FakeApiServer
) -> None:
    api.apply(k8s.NODES, k8s.node(NODE))  # no PodCIDR yet
    agent = start_agent(require_ipv4_pod_cidr=True)
    # The watchers start after the API serves: `server.cluster` is None until then.
    wait_until(lambda: agent.server.cluster is not None and any(NODE in m for m in agent.server.cluster.skipped),
               timeout=20, what="the node to be refused")
    assert agent.server.cluster is not None
    assert any("no IPv4 PodCIDR (--k8s-require-ipv4-pod-cidr)" in m for m in agent.server.cluster.skipped)
    refused = agent.cli("endpoint", "create", "early", "--namespace", NS)
    assert refused.exit_code != 0
    assert f"waiting for node {NODE}'s PodCIDR (--k8s-require-ipv4-pod-cidr)" in refused.output
    assert agent.call("status")["k8s"]["waiting"]
    text = agent.cli("status").output
    assert f"Kubernetes: node {NODE}, runtime none," in text and f"; waiting for node {NODE}'s PodCIDR" in text
    api.apply(k8s.NODES, k8s.node(NODE, "10.244.9.0/24"))
    wait_until(lambda: not agent.core.pod_cidr_missing, timeout=20, what="the node's PodCIDR")
    ep = agent.call("endpoint.create", {"name": "early", "namespace": NS})
    assert ipaddress.ip_address(ep["ipv4"]) in ipaddress.ip_network("10.244.9.0/24")


def test_410_gone_relist_reaches_the_endpoint(start_agent: Callable[..., InProcessAgent], api: FakeApiServer) -> None:
    """The pods watch is answered 410 Gone while a relabel is only in the list: the relist
    delivers it."""
    api.apply(k8s.PODS, k8s.pod(NS, "web", {"app": "web"}, NODE))
    agent = start_agent(create_endpoints=True)
    wait_endpoint(agent, "web")
    watcher = next(w for w in agent.server.cluster.watchers if w.resource.plural == "pods")
    relists = watcher.relists
    with api._lock:  # the relabel exists only in the list (its watch event compacted away)
        api.script[k8s.PODS].clear()
        api.script[k8s.PODS].append("gone")
        body = api.lists[k8s.PODS]
        relabelled = k8s.pod(NS, "web", {"app": "web", "v": "2"}, NODE)
        relabelled["metadata"]["resourceVersion"] = body["metadata"]["resourceVersion"] = "5000"
        body["items"] = [relabelled]
    try:
        wait_endpoint(agent, "web", lambda e: e["labels"].get("v") == "2")
    except AssertionError as exc:
        pods_requests = [(m, q) for m, p, q in api.requests if p == k8s.PODS][-6:]
        raise AssertionError(
            f"{exc}; watcher state={watcher.state} rv={watcher.resource_version} relists={watcher.relists} "
            f"skipped={agent.server.cluster.skipped} last requests={pods_requests}"
        ) from None
    assert watcher.relists > relists


# -- settings and flags -----------------------------------------------------------------------


def test_k8s_settings_from_file_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import flagella.agent
    from flagella.agent.settings import load_settings
    from flagella.cli import app
    from flagella.errors import InputError

    cfg = tmp_path / "agent.yaml"
    cfg.write_text("k8s: {kubeconfig: /etc/kc, node_name: node-a, require_ipv6_pod_cidr: true}\n")
    s = load_settings(cfg, k8s={"node_name": "node-b", "container_runtime": None})
    assert s.k8s.enabled and s.k8s.node_name == "node-b" and s.k8s.require_ipv6_pod_cidr
    assert s.k8s.container_runtime == "auto"
    assert not load_settings(None).k8s.enabled
    with pytest.raises(InputError, match="k8s.node_name: required"):
        load_settings(None, k8s={"kubeconfig": "/etc/kc"})
    with pytest.raises(InputError, match="container-runtime: 'rkt'"):
        load_settings(None, k8s={"container_runtime": "rkt"})
    with pytest.raises(InputError, match="ipv6_cluster_alloc_cidr: needs IPv6 pods"):
        load_settings(None, network={"ipv6_cidr": ""}, k8s={"ipv6_cluster_alloc_cidr": "fd00:10:244::/64"})
    cfg.write_text("k8s: {kubeconfig: /etc/kc, node: x}\n")
    with pytest.raises(InputError, match="k8s.node: unknown setting"):
        load_settings(cfg)

    seen: dict[str, Any] = {}
    monkeypatch.setattr(flagella.agent, "run", lambda config, **kw: seen.update(kw))
    monkeypatch.setenv("K8S_NODE_NAME", "node-env")
    out = CliRunner().invoke(app, [
        "agent", "--k8s-kubeconfig", "/etc/kc", "--k8s-require-ipv4-pod-cidr", "--k8s-require-ipv6-pod-cidr",
        "--ipv6-cluster-alloc-cidr", "fd00:10:244::/48", "--container-runtime", "crio", "--k8s-create-endpoints",
    ])
    assert out.exit_code == 0, out.output
    assert seen["k8s"] == {
        "kubeconfig": "/etc/kc", "in_cluster": None, "node_name": "node-env", "require_ipv4_pod_cidr": True,
        "require_ipv6_pod_cidr": True, "ipv6_cluster_alloc_cidr": "fd00:10:244::/48",
        "container_runtime": "crio", "create_endpoints": True,
    }


def test_bad_kubeconfig_is_an_input_error(tmp_path: Path) -> None:
    from flagella.errors import InputError
    from flagella.k8s import api_client

    with pytest.raises(InputError, match="k8s.kubeconfig: .*missing"):
        api_client(kubeconfig=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(InputError, match="k8s.kubeconfig"):
        api_client(kubeconfig=str(tmp_path / "empty"))


# -- the pod-labels path, in any order -----------------------------------------------------------

_label_sets = st.sampled_from([{"app": "a"}, {"app": "b"}, {"app": "a", "tier": "x"}, {}])
_ops = st.lists(
    st.tuples(st.sampled_from(["labels", "create", "delete", "forget"]), st.sampled_from(["p1", "p2"]),
              _label_sets, st.sampled_from([None, "sa1", "sa2"]), st.booleans()),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_pod_labels_in_any_order_with_endpoint_lifecycle(tmp_path_factory: pytest.TempPathFactory, ops: list[Any]) -> None:
    """Cluster labels, endpoint creates (given other labels), deletes and pod deletions in
    any order: an endpoint of a pod the cluster knows always carries the cluster's labels,
    service account and sidecar flag, and its identity is the one its labels allocate."""
    from flagella.agent.core import AgentCore
    from flagella.agent.settings import AgentSettings
    from flagella.datapath.port import MemoryDatapath

    core = AgentCore(AgentSettings(state_dir=str(tmp_path_factory.mktemp("podlabels"))), MemoryDatapath())
    core.restore()
    try:
        for op, name, labels, sa, sidecar in ops:
            ep = core.find_pod(NS, name)
            if op == "labels":
                core.set_pod_labels(NS, name, labels, sa, sidecar)
            elif op == "create" and ep is None:
                core.create_endpoint(name, NS, labels={"given": "cli"}, service_account="cli")
            elif op == "delete" and ep is not None:
                core.delete_endpoint(ep.id)
            elif op == "forget":
                core.forget_pod(NS, name)
            for ep in core.endpoints.values():
                known = core.known_pods.get((ep.namespace, ep.name))
                if known is not None:
                    assert (ep.labels, ep.service_account, ep.istio_sidecar) == known and not ep.init_identity
                assert core.allocator.labels(ep.identity) == core.security_labels(ep)
    finally:
        core.close()


def test_agent_with_a_bad_kubeconfig_exits_before_touching_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import flagella.agent._logs
    import flagella.datapath.kernel
    from flagella.cli import app

    def touched(*a: Any, **kw: Any) -> None:
        raise AssertionError("the kernel datapath was built")

    monkeypatch.setattr(flagella.datapath.kernel, "KernelDatapath", touched)
    # Logging stays as it is: configured onto the runner's stdout, it would outlive it.
    monkeypatch.setattr(flagella.agent._logs, "configure_logging", lambda: None)
    out = CliRunner().invoke(app, [
        "agent", "--state-dir", str(tmp_path / "state"), "--metrics-addr", "",
        "--k8s-kubeconfig", str(tmp_path / "nope"), "--k8s-node-name", "n1",
    ])
    assert out.exit_code == 2, out.output
    assert "k8s.kubeconfig:" in out.output and "nope" in out.output


def test_cni_plugin_add_with_the_watchers(start_agent: Callable[..., InProcessAgent], api: FakeApiServer) -> None:
    """The real `flagella-cni` ADD against the agent watching the double: a pod the cluster
    already showed starts with its real identity; one whose labels come later starts as
    ``reserved:init`` and leaves it when the watcher brings them."""
    import json

    from flagella.cni import run as cni
    from flagella.policy.identities import RESERVED_IDENTITIES

    api.apply(k8s.PODS, k8s.pod(NS, "early", {"app": "shop"}, NODE, service_account="clerk"))
    agent = start_agent()
    wait_until(lambda: (NS, "early") in agent.core.known_pods, timeout=20, what="the pod to be seen")

    def add(cid: str, name: str) -> dict[str, Any]:
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": f"/var/run/netns/rt-{cid}",
               "CNI_IFNAME": "eth0", "CNI_ARGS": f"K8S_POD_NAMESPACE={NS};K8S_POD_NAME={name}"}
        doc = {"cniVersion": "1.0.0", "name": "flagella", "type": "flagella-cni", "socket": agent.settings.socket_path}
        code, out = cni(env, json.dumps(doc).encode())
        assert code == 0, out
        return dict(agent.call("endpoint.get", {"name": f"{NS}/{name}"}))

    early = add("c-early", "early")
    assert not early["init_identity"] and early["identity"] != RESERVED_IDENTITIES["init"]
    assert early["labels"] == {"app": "shop"} and early["service_account"] == "clerk"
    late = add("c-late", "late")
    assert late["init_identity"] and late["identity"] == RESERVED_IDENTITIES["init"]
    api.apply(k8s.PODS, k8s.pod(NS, "late", {"app": "shop"}, NODE, service_account="clerk"))
    late = dict(wait_endpoint(agent, "late", lambda e: not e["init_identity"]).to_json())
    assert late["identity"] == early["identity"]  # the same labels: the same identity


def with_istio_proxy(pod: dict[str, Any], volume: dict[str, Any], mount_path: str = "/var/run/flagella") -> dict[str, Any]:
    """``pod`` as Istio's injector leaves it, its istio-proxy mounting ``volume`` (userVolume)."""
    pod["metadata"]["annotations"] = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.0",
                                      "volumeMounts": [{"name": "flagella-sock", "mountPath": mount_path}]})
    pod["spec"]["volumes"] = [{"name": "flagella-sock", **volume}]
    return pod


def test_istio_sidecar_flag_follows_the_pod(tmp_path: Path, api: FakeApiServer) -> None:
    """With ``istio.enabled``, a pod whose istio-proxy mounts the directory of the agent's
    xDS socket (hostPath) is flagged: its identity carries the sidecar label and its inbound
    HTTP is left to the sidecar. An emptyDir at the same path, another host directory, or the
    pod's own label do not flag it; the flag follows pod updates both ways."""
    from flagella.istio.workload import IstioSettings

    socket_dir = tmp_path / "sockets"
    agent = InProcessAgent(
        tmp_path / "agent", k8s=K8sSettings(kubeconfig=str(k8s.kubeconfig(tmp_path / "kubeconfig", api.url)),
                                            node_name=NODE, status_wait_s=10, create_endpoints=True),
        network=NetworkSettings(ipv4_cidr="10.244.0.0/16"), istio=IstioSettings(enabled=True),
        proxy=ProxySettings(enabled=False, xds_socket=str(socket_dir / "xds.sock")),
    )
    try:
        label = "io.cilium.k8s.policy.istiosidecarproxy"
        real = {"hostPath": {"path": f"{socket_dir}/", "type": "Directory"}}
        cases = {
            "real": (with_istio_proxy(k8s.pod(NS, "real", {"app": "a"}, NODE, ips=("10.244.1.1",)), real), True),
            "empty-dir": (with_istio_proxy(k8s.pod(NS, "empty-dir", {"app": "a"}, NODE, ips=("10.244.1.2",)),
                                           {"emptyDir": {}}), False),
            "other-dir": (with_istio_proxy(k8s.pod(NS, "other-dir", {"app": "a"}, NODE, ips=("10.244.1.3",)),
                                           {"hostPath": {"path": str(tmp_path)}}), False),
            "elsewhere": (with_istio_proxy(k8s.pod(NS, "elsewhere", {"app": "a"}, NODE, ips=("10.244.1.4",)),
                                           real, mount_path="/etc/flagella"), False),
            "own-label": (k8s.pod(NS, "own-label", {"app": "a", label: "true"}, NODE, ips=("10.244.1.5",)), False),
        }
        for pod, _ in cases.values():
            api.apply(k8s.PODS, pod)
        for name, (_, flagged) in cases.items():
            ep = wait_endpoint(agent, name, lambda e, f=flagged: e["istio_sidecar"] is f)
            identity = agent.call("identity.get", {"id": ep.identity})
            assert (f"k8s:{label}=true" in identity["labels"]) is flagged, name

        plain = k8s.pod(NS, "real", {"app": "a"}, NODE, ips=("10.244.1.1",))
        api.apply(k8s.PODS, plain)  # the sidecar taken out: the flag goes
        wait_endpoint(agent, "real", lambda e: e["istio_sidecar"] is False)
        api.apply(k8s.PODS, with_istio_proxy(plain, real))  # and back
        wait_endpoint(agent, "real", lambda e: e["istio_sidecar"] is True)
    finally:
        agent.close()
