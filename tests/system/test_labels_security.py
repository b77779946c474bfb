"""Label attacks against a real agent, through its CLI and socket (issue 11, items 1 and 7).

* Reserved keys: a pod may not claim the labels the agent derives (namespace, namespace
  labels, service account, cluster). ``endpoint create``, ``endpoint labels --set`` and
  ``namespace labels --set`` refuse them, naming the key; no identity carries them, and the
  policy they would have satisfied still drops the pod's traffic.
* ``endpoint create --namespace-labels`` moves the pods already in the namespace, as
  ``namespace labels`` does: checked with real traffic through a ``namespaceSelector``.
* Online ``policy trace --src-endpoint/--dst-endpoint`` shows the endpoints' real identities.
* Bad label keys and values are refused with the field named; nothing is created.
* The state dir is root's alone: 0700 directories, 0600 files, the socket 0660.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.system._support import (
    Agent,
    Cluster,
    assert_allowed,
    assert_denied,
    cnp_ingress,
    namespace,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

AGENT_TAG = "sl"
MakeCluster = Callable[[Agent], Cluster]

NAMESPACE_KEY = "io.kubernetes.pod.namespace"
SPOOFS = [
    pytest.param(NAMESPACE_KEY, "kube", id="namespace"),
    pytest.param("io.cilium.k8s.namespace.labels.team", "admin", id="namespace-labels"),
    pytest.param("io.cilium.k8s.policy.serviceaccount", "admin", id="serviceaccount"),
    pytest.param("io.cilium.k8s.policy.cluster", "other", id="cluster"),
]


def _identity_labels(agent: Agent) -> list[list[str]]:
    return [i["labels"] for i in agent.cli_json("identity", "list")]


def _endpoint_names(agent: Agent) -> set[str]:
    return {f"{e['namespace']}/{e['name']}" for e in agent.cli_json("endpoint", "list")}


def _create_refused(agent: Agent, *args: str) -> str:
    """``endpoint create`` that must fail; returns stderr. A pod it made anyway is deleted."""
    name, ns = args[0], args[args.index("-n") + 1]
    p = agent.cli("endpoint", "create", *args, check=False)
    if p.returncode == 0:
        agent.cli("endpoint", "delete", f"{ns}/{name}", check=False)
    assert p.returncode == 2, f"endpoint create {' '.join(args)} was accepted: {p.stdout}"
    assert f"{ns}/{name}" not in _endpoint_names(agent)
    return p.stderr


@pytest.mark.parametrize(("key", "value"), SPOOFS)
def test_endpoint_create_refuses_a_label_the_agent_owns(module_agent: Agent, key: str, value: str) -> None:
    agent = module_agent
    ns = namespace("sla")
    err = _create_refused(agent, "evil", "-n", ns, "-l", f"app=admin,{key}={value}")
    assert key in err and "reserved" in err, err
    # The same key as a namespace label is refused too.
    err = _create_refused(agent, "evil", "-n", ns, "-l", "app=admin", "--namespace-labels", f"{key}={value}")
    assert key in err, err
    forged = f"k8s:{key}={value}"
    assert not [labels for labels in _identity_labels(agent) if forged in labels]


def test_spoofed_namespace_does_not_pass_a_kube_system_policy(module_agent: Agent, make_cluster: MakeCluster) -> None:
    """The attack of issue 11: ``app=admin`` plus a forged namespace label, against a policy in
    the victim namespace that admits its own ``app=admin`` pods."""
    agent = module_agent
    c = make_cluster(agent)
    victim_ns, evil_ns = namespace("slk"), namespace("slb")
    server = c.create("server", victim_ns, 30, {"app": "server"})
    admin = c.create("admin", victim_ns, 31, {"app": "admin"})
    c.servers.tcp_echo(server.netns, server.ipv4, 7400)
    c.import_policy(cnp_ingress("sys-admins", victim_ns, {"app": "server"}, {"app": "admin"}, [(7400, "TCP")]))
    assert_allowed(admin, server.ipv4, 7400, "the victim namespace's own admin")

    err = _create_refused(agent, "evil", "-n", evil_ns, "-l", f"app=admin,{NAMESPACE_KEY}={victim_ns}")
    assert NAMESPACE_KEY in err, err
    # The relabel path: an ordinary pod of the attacker's namespace tries the same.
    evil = c.create("evil", evil_ns, 32, {"app": "admin"})
    p = agent.cli("endpoint", "labels", evil.key, "--set", f"{NAMESPACE_KEY}={victim_ns}", check=False)
    assert p.returncode == 2 and NAMESPACE_KEY in p.stderr, (p.returncode, p.stderr)
    got = agent.cli_json("endpoint", "get", evil.key)
    assert got["identity"] == evil.ep["identity"], got
    assert [x for x in got["identity_labels"] if NAMESPACE_KEY in x] == [f"k8s:{NAMESPACE_KEY}={evil_ns}"], got
    # And the namespace path: a namespace label may not name a reserved key either.
    p = agent.cli("namespace", "labels", evil_ns, "--set", "io.cilium.k8s.policy.serviceaccount=admin", check=False)
    assert p.returncode == 2 and "io.cilium.k8s.policy.serviceaccount" in p.stderr, p.stderr
    assert_denied(evil, server.ipv4, 7400, "a pod of another namespace with app=admin")
    # The trace agrees with the kernel.
    trace = json.loads(
        agent.cli("policy", "trace", "--src-endpoint", evil.key, "--dst-endpoint", server.key,
                  "--dport", "7400/TCP", "-o", "json").stdout
    )
    assert trace["verdict"] == "denied", trace
    for labels in _identity_labels(agent):
        namespaces = [x for x in labels if x.startswith(f"k8s:{NAMESPACE_KEY}=")]
        assert len(namespaces) <= 1, f"an identity with two namespaces: {labels}"


def test_create_with_namespace_labels_moves_the_pods_already_there(
    module_agent: Agent, make_cluster: MakeCluster
) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns, peer_ns = namespace("slc"), namespace("sld")
    server = c.create("server", ns, 40, {"app": "server"})
    early = c.create("early", peer_ns, 41, {"app": "client"})
    c.servers.tcp_echo(server.netns, server.ipv4, 7401)
    c.import_policy(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "sys-from-blue", "namespace": ns},
            "spec": {
                "podSelector": {"matchLabels": {"app": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}],
                             "ports": [{"protocol": "TCP", "port": 7401}]}],
            },
        }
    )
    assert_denied(early, server.ipv4, 7401, "before the namespace is team=blue")
    late = c.create("late", peer_ns, 42, {"app": "client"}, namespace_labels={"team": "blue"})
    got = agent.cli_json("endpoint", "get", early.key)
    assert got["namespace_labels"] == {"team": "blue"}, got
    assert got["identity"] == late.ep["identity"] != early.ep["identity"], (got, late.ep)
    assert_allowed(late, server.ipv4, 7401, "created with --namespace-labels team=blue")
    assert_allowed(early, server.ipv4, 7401, "already in the namespace when it became team=blue")


def test_online_trace_shows_the_endpoints_real_identities(module_agent: Agent, make_cluster: MakeCluster) -> None:
    agent = module_agent
    c = make_cluster(agent)
    ns = namespace("sle")
    pods = [c.create(f"p{i}", ns, 50 + i, {"app": f"p{i}"}) for i in range(3)]
    src, dst = pods[2], pods[0]  # the third pod's identity is not the first two numbers
    args = ("policy", "trace", "--src-endpoint", src.key, "--dst-endpoint", dst.key, "--dport", "80/TCP")
    answer = json.loads(agent.cli(*args, "-o", "json").stdout)
    assert (answer["src_identity"], answer["dst_identity"]) == (src.ep["identity"], dst.ep["identity"]), answer
    text = agent.cli(*args).stdout
    assert f"Tracing identity {src.ep['identity']} => identity {dst.ep['identity']}" in text, text


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("app=bad value", "'bad value'"),
        ("app=" + "v" * 70, "invalid value"),
        ("bad key!=x", "'bad key!'"),
        ("app=-edge", "'-edge'"),
    ],
    ids=["space", "70-chars", "key", "edge"],
)
def test_bad_label_is_refused_and_nothing_is_created(module_agent: Agent, labels: str, message: str) -> None:
    err = _create_refused(module_agent, "bad", "-n", namespace("slf"), "-l", labels)
    assert "--labels" in err and message in err, err


def test_bad_selector_key_in_a_policy_is_refused_naming_the_field(module_agent: Agent, tmp_path: Path) -> None:
    doc = cnp_ingress("sys-bad-key", namespace("slf"), {"a b": "x"}, {"app": "y"}, [(80, "TCP")])
    doc["spec"]["ingress"][0]["fromEndpoints"] = [
        {"matchExpressions": [{"key": "bad key!", "operator": "Exists"}]}
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    p = module_agent.cli("policy", "import", str(path), check=False)
    assert p.returncode == 2, p
    assert "spec.endpointSelector.matchLabels.a b" in p.stderr, p.stderr
    assert "spec.ingress[0].fromEndpoints[0].matchExpressions[0].key" in p.stderr, p.stderr
    assert not [x for x in module_agent.call("policy.get")["policies"] if "sys-bad-key" in json.dumps(x)]


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def test_state_dir_is_root_only(make_agent: Callable[..., Agent], make_cluster: MakeCluster) -> None:
    agent = make_agent("sm")
    c = make_cluster(agent)
    ns = namespace("slm")
    c.create("pod", ns, 60, {"app": "pod"}, namespace_labels={"team": "blue"})
    c.import_policy(cnp_ingress("sys-modes", ns, {"app": "pod"}, {"app": "x"}, [(80, "TCP")]))
    agent.stop()
    agent.start()  # restore rewrites records too
    root = agent.state_dir
    modes = _modes(root)
    assert {"identities.db", "policies.json", "namespaces.json", "flagella.sock"} <= set(modes), modes
    wrong: dict[str, Any] = {}
    for name, mode in modes.items():
        path = root / name
        want = 0o700 if path.is_dir() else 0o660 if path.is_socket() else 0o600
        if mode != want:
            wrong[name] = f"{mode:o} (want {want:o})"
    assert not wrong, wrong
