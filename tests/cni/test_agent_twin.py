"""The plugin against the real agent (its API socket and `flagella.agent.cni`) over the
in-memory datapath twin: the bookkeeping of ADD, DEL, CHECK and GC, and the init identity.
The kernel side is tested for real in `test_cni_root.py`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagella.agent.settings import CniSettings
from flagella.cni import run
from flagella.errors import FlagellaError
from flagella.policy.identities import RESERVED_IDENTITIES
from tests.agent.inprocess import InProcessAgent

INIT = RESERVED_IDENTITIES["init"]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[InProcessAgent]:
    a = InProcessAgent(tmp_path / "state", cni=CniSettings(conf_dir=str(tmp_path / "net.d")))
    yield a
    a.close()


def plugin(agent: InProcessAgent, command: str, cid: str, pod: tuple[str, str] | None = ("ns1", "web"), **conf: Any) -> tuple[int, Any]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": f"/var/run/netns/rt-{cid}", "CNI_IFNAME": "eth0"}
    if pod:
        env["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]};K8S_POD_UID=1"
    doc = {"cniVersion": "1.0.0", "name": "flagella", "type": "flagella-cni", "socket": agent.settings.socket_path, **conf}
    code, out = run(env, json.dumps(doc).encode())
    return code, json.loads(out) if out else None


def endpoint(agent: InProcessAgent, ref: str) -> dict[str, Any]:
    return dict(agent.call("endpoint.get", {"name": ref}))


def test_conflist_written_atomically(agent: InProcessAgent, tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    assert sorted(p.name for p in conf_dir.iterdir()) == ["00-flagella.conflist"]  # no temp file left
    doc = json.loads((conf_dir / "00-flagella.conflist").read_text())
    assert doc["name"] == "flagella" and doc["cniVersion"] == "1.0.0"
    assert doc["plugins"] == [{"type": "flagella-cni", "socket": agent.settings.socket_path}]


def test_add_is_init_until_labels_arrive(agent: InProcessAgent) -> None:
    code, result = plugin(agent, "ADD", "c1")
    assert code == 0, result
    ep = endpoint(agent, "ns1/web")
    assert ep["identity"] == INIT and ep["init_identity"] and ep["container_id"] == "c1"
    assert ep["state"] == "ready"
    assert result["ips"][0] == {"address": f"{ep['ipv4']}/32", "gateway": "169.254.1.1", "interface": 0}
    assert result["interfaces"] == [{"name": "eth0", "mac": ep["mac"], "sandbox": "/var/run/netns/rt-c1"}]
    # A repeated ADD of the same container answers the same attachment.
    assert plugin(agent, "ADD", "c1") == (0, result)
    # The watcher's entry point gives the pod its labels: a real identity.
    agent.core.set_pod_labels("ns1", "web", {"app": "web"}, "default")
    ep = endpoint(agent, "ns1/web")
    assert ep["identity"] >= 256 and not ep["init_identity"]
    assert "k8s:app=web" in ep["identity_labels"]


def test_labels_known_before_add_skip_init(agent: InProcessAgent) -> None:
    assert agent.core.set_pod_labels("ns1", "early", {"app": "early"}) is None
    assert plugin(agent, "ADD", "c2", ("ns1", "early"))[0] == 0
    ep = endpoint(agent, "ns1/early")
    assert ep["identity"] >= 256 and not ep["init_identity"]


def test_endpoint_labels_command_also_ends_init(agent: InProcessAgent) -> None:
    assert plugin(agent, "ADD", "c3")[0] == 0
    agent.call("endpoint.labels", {"name": "ns1/web", "set": ["app=x"]})
    assert endpoint(agent, "ns1/web")["identity"] != INIT


def test_del_is_idempotent(agent: InProcessAgent) -> None:
    assert plugin(agent, "ADD", "c4")[0] == 0
    assert plugin(agent, "DEL", "c4") == (0, None)
    assert plugin(agent, "DEL", "c4") == (0, None)
    assert plugin(agent, "DEL", "never-added") == (0, None)
    assert agent.call("endpoint.list") == []
    assert agent.dp.pods == {}


def test_check(agent: InProcessAgent) -> None:
    code, result = plugin(agent, "ADD", "c5")
    assert plugin(agent, "CHECK", "c5", prevResult=result) == (0, None)
    code, err = plugin(agent, "CHECK", "unknown")
    assert code == 1 and err["code"] == 3
    # The pod's plumbing disappears behind the agent's back: CHECK says so.
    agent.dp.pods.clear()
    code, err = plugin(agent, "CHECK", "c5")
    assert code == 1 and err["code"] == 100 and "missing" in err["details"], err


def test_new_sandbox_replaces_the_old_attachment(agent: InProcessAgent) -> None:
    assert plugin(agent, "ADD", "old")[0] == 0
    old = endpoint(agent, "ns1/web")
    assert plugin(agent, "ADD", "new")[0] == 0
    eps = agent.call("endpoint.list")
    assert [(e["name"], e["container_id"]) for e in eps] == [("web", "new")]
    assert eps[0]["id"] != old["id"]


def test_add_refuses_an_endpoint_not_made_by_cni(agent: InProcessAgent) -> None:
    agent.call("endpoint.create", {"name": "web", "namespace": "ns1"})
    code, err = plugin(agent, "ADD", "c6")
    assert code == 1 and err["code"] == 100 and "not made by CNI" in err["details"], err


def test_podless_container_and_gc(agent: InProcessAgent) -> None:
    for cid in ("g1", "g2", "g3"):
        assert plugin(agent, "ADD", cid, pod=None)[0] == 0
    valid = [{"containerID": "g2", "ifname": "eth0"}]
    assert plugin(agent, "GC", "", **{"cni.dev/valid-attachments": valid}) == (0, None)
    assert [e["container_id"] for e in agent.call("endpoint.list")] == ["g2"]
    code, err = plugin(agent, "GC", "")
    assert code == 1 and "valid-attachments" in err["msg"]


def test_mtu_from_conf_else_host_route(agent: InProcessAgent) -> None:
    assert plugin(agent, "ADD", "m1", ("ns1", "a"), mtu=1400)[0] == 0
    assert endpoint(agent, "ns1/a")["mtu"] == 1400
    agent.dp.route_mtu = 9000
    assert plugin(agent, "ADD", "m2", ("ns1", "b"))[0] == 0
    assert endpoint(agent, "ns1/b")["mtu"] == 9000


def test_bad_pod_name_is_refused_with_nothing_left(agent: InProcessAgent) -> None:
    code, err = plugin(agent, "ADD", "c7", ("ns1", "Not_A_DNS_Label"))
    assert code == 1 and err["code"] == 100 and "Not_A_DNS_Label" in err["details"], err
    assert agent.call("endpoint.list") == [] and agent.dp.pods == {} and agent.dp.adopted == {}


def test_zipapp_runs_on_a_bare_python(agent: InProcessAgent, tmp_path: Path) -> None:
    """The artifact the DaemonSet installs into /opt/cni/bin: built by the image's script,
    run by an isolated interpreter (no PYTHONPATH, no site-packages), ADD and DEL included."""
    import importlib.util
    import subprocess
    import sys

    from tests.support.host import REPO

    spec = importlib.util.spec_from_file_location("build_cni_zipapp", REPO / "scripts" / "build_cni_zipapp.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    plugin_path = builder.build(REPO / "src", tmp_path / "bin" / "flagella-cni")

    def invoke(env: dict[str, str], doc: dict[str, Any]) -> tuple[int, Any]:
        p = subprocess.run(
            [sys.executable, "-I", "-S", str(plugin_path)], input=json.dumps(doc).encode(),
            env=env, capture_output=True, timeout=60, cwd=tmp_path,
        )
        return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None

    base = {"cniVersion": "1.0.0", "name": "flagella", "type": "flagella-cni", "socket": agent.settings.socket_path}
    env = {"CNI_CONTAINERID": "z1", "CNI_NETNS": "/var/run/netns/rt-z1", "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=zip"}
    assert invoke({"CNI_COMMAND": "VERSION"}, base)[1]["supportedVersions"] == ["1.0.0", "1.1.0"]
    code, result = invoke({**env, "CNI_COMMAND": "ADD"}, base)
    assert code == 0 and result["ips"][0]["address"] == endpoint(agent, "ns1/zip")["ipv4"] + "/32"
    assert invoke({**env, "CNI_COMMAND": "DEL"}, base) == (0, None)
    code, err = invoke({**env, "CNI_COMMAND": "ADD"}, {**base, "mtu": "big"})
    assert code == 1 and err["code"] == 7 and "mtu" in err["msg"]


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12), st.just("/var/run/netns/x"))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["cni.add", "cni.del", "cni.check", "cni.gc"]),
    st.dictionaries(
        st.sampled_from(["container_id", "netns", "ifname", "pod_namespace", "pod_name", "mtu", "valid"]),
        _values, max_size=6,
    ),
)
def test_cni_api_fuzz(agent: InProcessAgent, method: str, params: dict[str, Any]) -> None:
    """Arbitrary ``cni.*`` parameters: an answer or a FlagellaError with a message; a
    refused ADD leaves no endpoint, pod or adopted namespace behind."""
    before = set(agent.core.endpoints)
    try:
        agent.server.handlers[method](params)
    except FlagellaError as exc:
        assert str(exc)
        if method == "cni.add":
            assert set(agent.core.endpoints) == before
            assert set(agent.dp.adopted) <= {e.netns for e in agent.core.endpoints.values()}
    assert set(agent.dp.pods) == {e.netns for e in agent.core.endpoints.values()}


def test_status(agent: InProcessAgent, tmp_path: Path) -> None:
    assert plugin(agent, "STATUS", "") == (0, None)
    code, err = plugin(agent, "STATUS", "", socket=str(tmp_path / "none.sock"))
    assert code == 1 and err["code"] == 50, err
