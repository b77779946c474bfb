"""``flagella-cni`` against the real agent in real network namespaces, in the style of the
conformance suite: a test plays the container runtime. It makes the pod's network
namespace (``ip netns add``), runs the plugin executable with the CNI environment and the
configuration on stdin, and checks the result, the kernel and traffic.

Names carry the test process's pid (`tests.system._support`): the runtime's namespaces
are ``sys-<pid>cnirt-<k>``, the agent's node ``sys-<pid><tag>-node``; every one is removed
in ``finally`` blocks (and by `sweep_stale` after a crash).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from flagella.datapath.port import pod_netns_name
from flagella.policy.identities import RESERVED_IDENTITIES
from tests.support.host import PYTHON, netns_names, sh, wait_until
from tests.system._support import (
    NS_PREFIX,
    Agent,
    Cluster,
    host_ifname_for,
    links,
    namespace,
    tcp_connect,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("system_host")]

INIT = RESERVED_IDENTITIES["init"]
INIT_POLICY = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumClusterwideNetworkPolicy",
    "metadata": {"name": "init"},
    "spec": {
        "endpointSelector": {"matchLabels": {"reserved:init": ""}},
        "ingress": [{"fromEntities": ["host"]}],
        "egress": [{"toPorts": [{"ports": [{"port": "7001", "protocol": "TCP"}]}]}],
    },
}


def runtime_netns(k: int | str) -> str:
    return f"{NS_PREFIX}cnirt-{k}"


class Runtime:
    """What a container runtime does for CNI: namespaces, and runs of the plugin."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.made: list[str] = []
        self.added: list[str] = []
        self.pods: list[str] = []  # the agent's names for the runtime's namespaces

    def netns(self, k: int | str) -> str:
        name = runtime_netns(k)
        sh("ip", "netns", "add", name)
        self.made.append(name)
        return name

    def env(self, command: str, cid: str, netns: str | None, pod: tuple[str, str] | None, ifname: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_IFNAME": ifname,
            "CNI_PATH": "/opt/cni/bin",
            "CNI_NETNS": f"/var/run/netns/{netns}" if netns else "",
        }
        if pod:
            env["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]}"
        return env

    def start(
        self, command: str, cid: str, netns: str | None = None, pod: tuple[str, str] | None = None,
        ifname: str = "eth0", **conf: Any,
    ) -> subprocess.Popen[bytes]:
        if command == "ADD":
            self.added.append(cid)
            if pod:
                self.pods.append(pod_netns_name(*pod))
        doc = {"cniVersion": "1.0.0", "name": "flagella", "type": "flagella-cni", "socket": self.agent.socket, **conf}
        p = subprocess.Popen(
            [PYTHON, "-m", "flagella.cni"], env=self.env(command, cid, netns, pod, ifname),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert p.stdin is not None
        p.stdin.write(json.dumps(doc).encode())
        p.stdin.close()
        return p

    @staticmethod
    def finish(p: subprocess.Popen[bytes]) -> tuple[int, Any]:
        assert p.stdout is not None and p.stderr is not None
        out = p.stdout.read()
        err = p.stderr.read()
        code = p.wait(timeout=120)
        assert not err or code, err  # nothing on stderr when it worked
        return code, json.loads(out) if out.strip() else None

    def run(self, command: str, cid: str, netns: str | None = None, pod: tuple[str, str] | None = None, **kw: Any) -> tuple[int, Any]:
        return self.finish(self.start(command, cid, netns, pod, **kw))

    def close(self) -> None:
        for cid in self.added:
            if self.agent.alive:
                self.run("DEL", cid)
        names = netns_names()
        for name in [*self.pods, *self.made]:
            if name in names:
                sh("ip", "netns", "del", name, check=False)


@contextmanager
def cni_setup(make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster], tag: str, conf_dir: Path | None = None) -> Iterator[tuple[Agent, Cluster, Runtime]]:
    agent = make_agent(tag, start=False)
    if conf_dir is not None:
        with open(agent.config, "a") as f:
            f.write(f"cni: {{conf_dir: {conf_dir}}}\n")
    agent.start()
    cluster = make_cluster(agent)
    runtime = Runtime(agent)
    try:
        yield agent, cluster, runtime
    finally:
        runtime.close()


def ip_json(*args: str, netns: str) -> list[dict[str, Any]]:
    return list(json.loads(sh("ip", "-j", *args, netns=netns).stdout or "[]"))


def pod_addresses(netns: str, ifname: str) -> set[str]:
    return {
        f"{a['local']}/{a['prefixlen']}"
        for link in ip_json("addr", "show", "dev", ifname, netns=netns)
        for a in link["addr_info"]
        if a.get("scope") != "link"
    }


def test_add_check_del_and_init_identity(make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster], tmp_path: Path) -> None:
    with cni_setup(make_agent, make_cluster, "cni", conf_dir=tmp_path / "net.d") as (agent, cluster, runtime):
        ns = namespace("cni")
        # The agent wrote its configuration for the runtime.
        conflist = json.loads((tmp_path / "net.d" / "00-flagella.conflist").read_text())
        assert conflist["plugins"] == [{"type": "flagella-cni", "socket": agent.socket}]

        revision = agent.call("policy.import", {"documents": [INIT_POLICY]})["revision"]
        server = cluster.create("server", ns, 10, labels={"app": "server"})
        for port in (7001, 7002):
            cluster.servers.tcp_echo(server.netns, server.ipv4, port)
        wait_until(lambda: not agent.call("policy.wait", {"revision": revision})["waiting"], timeout=30)

        rt = runtime.netns("a")
        code, result = runtime.run("ADD", "cid-a", rt, (ns, "client"))
        assert code == 0, result
        ep = agent.call("endpoint.get", {"name": f"{ns}/client"})
        # ADD returned with the endpoint ready and enforcing the init identity's policy.
        assert ep["identity"] == INIT and ep["state"] == "ready", ep
        assert ep["policy_enforcement"] == {"ingress": True, "egress": True}, ep
        client_ip = ep["ipv4"]
        assert result["interfaces"] == [{"name": "eth0", "mac": ep["mac"], "sandbox": f"/var/run/netns/{rt}"}]
        assert {ip["address"] for ip in result["ips"]} == pod_addresses(rt, "eth0")
        assert {"dst": "0.0.0.0/0", "gw": "169.254.1.1"} in result["routes"]
        # The kernel shows it: the pod end in the runtime's namespace, the host end in the node.
        (eth0,) = ip_json("link", "show", "dev", "eth0", netns=rt)
        assert eth0["address"] == ep["mac"]
        assert host_ifname_for(pod_netns_name(ns, "client")) in {link["ifname"] for link in links(agent.node)}

        # Traffic: the init policy allows egress to 7001 only, ingress from the host only.
        cluster.servers.tcp_echo(rt, client_ip, 8080)
        assert tcp_connect(rt, server.ipv4, 7001, 2.0) == "open"
        assert tcp_connect(rt, server.ipv4, 7002, 0.5) == "timeout"
        assert tcp_connect(server.netns, client_ip, 8080, 0.5) == "timeout"

        # The labels arrive: the pod switches to its real identity (no policy selects it).
        agent.call("endpoint.labels", {"name": f"{ns}/client", "set": ["app=client"]})
        ep = agent.call("endpoint.get", {"name": f"{ns}/client"})
        assert ep["identity"] not in (0, INIT) and "k8s:app=client" in ep["identity_labels"]
        assert tcp_connect(rt, server.ipv4, 7002, 2.0) == "open"
        assert tcp_connect(server.netns, client_ip, 8080, 2.0) == "open"

        # CHECK with the ADD result as prevResult passes; after tampering it names the problem.
        assert runtime.run("CHECK", "cid-a", rt, (ns, "client"), prevResult=result) == (0, None)
        sh("ip", "addr", "del", f"{client_ip}/32", "dev", "eth0", netns=rt)
        code, err = runtime.run("CHECK", "cid-a", rt, (ns, "client"))
        assert code == 1 and err["code"] == 100 and client_ip in err["details"], err
        code, err = runtime.run("CHECK", "cid-unknown", rt, (ns, "client"))
        assert code == 1 and err["code"] == 3, err

        # DEL removes the attachment and leaves the runtime's namespace; DEL is idempotent.
        assert runtime.run("DEL", "cid-a", rt, (ns, "client")) == (0, None)
        assert [e["name"] for e in agent.call("endpoint.list")] == ["server"]
        assert ip_json("link", "show", netns=rt) and not [
            link for link in ip_json("link", "show", netns=rt) if link["ifname"] == "eth0"
        ]
        assert rt in netns_names() and pod_netns_name(ns, "client") not in netns_names()
        assert host_ifname_for(pod_netns_name(ns, "client")) not in {link["ifname"] for link in links(agent.node)}
        assert runtime.run("DEL", "cid-a", rt, (ns, "client")) == (0, None)
        assert runtime.run("DEL", "cid-a", None, (ns, "client")) == (0, None)
        assert runtime.run("DEL", "cid-never", rt, (ns, "other")) == (0, None)


def test_concurrent_adds(make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]) -> None:
    with cni_setup(make_agent, make_cluster, "cnic") as (agent, cluster, runtime):
        ns = namespace("cnic")
        # Without a policy that selects reserved:init, init pods are denied both ways.
        agent.call("policy.import", {"documents": [INIT_POLICY]})
        server = cluster.create("server", ns, 10, labels={"app": "server"})
        cluster.servers.tcp_echo(server.netns, server.ipv4, 7001)
        rts = [runtime.netns(f"c{k}") for k in range(8)]
        procs = [runtime.start("ADD", f"cid-{k}", rt, (ns, f"pod{k}")) for k, rt in enumerate(rts)]
        results = [runtime.finish(p) for p in procs]
        assert [code for code, _ in results] == [0] * 8, results
        addresses = [r["ips"][0]["address"] for _, r in results]
        assert len(set(addresses)) == 8
        for rt, addr in zip(rts, addresses, strict=True):
            assert pod_addresses(rt, "eth0") >= {addr}
            assert tcp_connect(rt, server.ipv4, 7001, 2.0) == "open"
        procs = [runtime.start("DEL", f"cid-{k}", rt, (ns, f"pod{k}")) for k, rt in enumerate(rts)]
        assert [runtime.finish(p) for p in procs] == [(0, None)] * 8
        assert [e["name"] for e in agent.call("endpoint.list")] == ["server"]
        assert not any(pod_netns_name(ns, f"pod{k}") in netns_names() for k in range(8))


def test_adoption_refuses_what_is_not_the_pods(make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]) -> None:
    """An attacker-chosen (or misconfigured) CNI_NETNS or CNI_IFNAME never takes over
    something the agent did not make: the agent's own namespace, an existing interface,
    a namespace that already holds another pod."""
    with cni_setup(make_agent, make_cluster, "cnis") as (agent, cluster, runtime):
        ns = namespace("cnis")
        code, err = runtime.run("ADD", "cid-node", agent.node, (ns, "p1"))
        assert code == 1 and "agent's own network namespace" in err["details"], err
        # A file that is not a network namespace (here: a mount namespace, and a plain file).
        for fake in ("/proc/self/ns/mnt", str(agent.config)):
            env = runtime.env("ADD", "cid-fake", None, (ns, "p0"), "eth0") | {"CNI_NETNS": fake}
            doc = {"cniVersion": "1.0.0", "name": "flagella", "type": "flagella-cni", "socket": agent.socket}
            out = subprocess.run([PYTHON, "-m", "flagella.cni"], input=json.dumps(doc).encode(), env=env, capture_output=True, timeout=120)
            err = json.loads(out.stdout)
            assert out.returncode == 1 and "is not a network namespace" in err["details"], err

        rt = runtime.netns("s1")
        sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0", netns=rt)
        code, err = runtime.run("ADD", "cid-taken", rt, (ns, "p2"))
        assert code == 1 and "interface eth0 already exists" in err["details"], err
        (mine,) = ip_json("link", "show", "dev", "eth0", netns=rt)
        assert mine["link"] == "other0"  # untouched: still the runtime's own pair

        rt2 = runtime.netns("s2")
        assert runtime.run("ADD", "cid-first", rt2, (ns, "p3"))[0] == 0
        code, err = runtime.run("ADD", "cid-second", rt2, (ns, "p4"), ifname="eth1")
        assert code == 1 and "already holds pod" in err["details"], err
        assert [e["name"] for e in agent.call("endpoint.list")] == ["p3"]
        for pod in ("p1", "p2", "p4"):
            assert pod_netns_name(ns, pod) not in netns_names()


def test_mtu_from_conf_or_host_route(make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]) -> None:
    with cni_setup(make_agent, make_cluster, "cnim") as (agent, cluster, runtime):
        ns = namespace("cnim")
        rt = runtime.netns("m1")
        assert runtime.run("ADD", "cid-m1", rt, (ns, "m1"), mtu=1400)[0] == 0
        assert ip_json("link", "show", "dev", "eth0", netns=rt)[0]["mtu"] == 1400
        # The node's default route goes out of a 9000-byte device: pods take its MTU.
        sh("ip", "link", "add", "fldum0", "mtu", "9000", "type", "veth", "peer", "name", "fldum1", "mtu", "9000", netns=agent.node)
        for dev in ("fldum0", "fldum1"):
            sh("ip", "link", "set", dev, "up", netns=agent.node)
        sh("ip", "route", "add", "default", "dev", "fldum0", netns=agent.node)
        rt2 = runtime.netns("m2")
        code, result = runtime.run("ADD", "cid-m2", rt2, (ns, "m2"), ifname="net0")
        assert code == 0, result
        assert ip_json("link", "show", "dev", "net0", netns=rt2)[0]["mtu"] == 9000
        assert result["interfaces"][0]["name"] == "net0"


def test_attachment_survives_an_agent_restart(make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]) -> None:
    """The restarted agent finds the adopted namespace and its pod end (named net1, found as
    the host veth's peer): CHECK passes, traffic flows, DEL cleans up."""
    with cni_setup(make_agent, make_cluster, "cnir") as (agent, cluster, runtime):
        ns = namespace("cnir")
        agent.call("policy.import", {"documents": [INIT_POLICY]})
        server = cluster.create("server", ns, 10)
        cluster.servers.tcp_echo(server.netns, server.ipv4, 7001)
        rt = runtime.netns("r1")
        code, result = runtime.run("ADD", "cid-r1", rt, (ns, "r1"), ifname="net1")
        assert code == 0, result
        before = agent.call("endpoint.get", {"name": f"{ns}/r1"})
        agent.stop()
        agent.start()
        after = agent.call("endpoint.get", {"name": f"{ns}/r1"})
        assert (after["id"], after["ifindex"], after["ifname"]) == (before["id"], before["ifindex"], "net1")
        assert runtime.run("CHECK", "cid-r1", rt, (ns, "r1"), ifname="net1", prevResult=result) == (0, None)
        assert tcp_connect(rt, server.ipv4, 7001, 2.0) == "open"
        assert runtime.run("DEL", "cid-r1", rt, (ns, "r1"), ifname="net1") == (0, None)
        assert not [link for link in ip_json("link", "show", netns=rt) if link["ifname"] == "net1"]
