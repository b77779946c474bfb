"""Several Flagella nodes on one machine, sharing a real etcd: the multi-node test bed.

Topology (every name carries this process's pid, so concurrent runs never meet)::

    fabric netns  sys-<pid>mn-fabric:  bridge br0 10.250.0.254/24, etcd on 10.250.0.254:2379
        |-- veth nodeN <-> eth0 of node netns sys-<pid>mn<x>-node  (10.250.0.N/24)
    node netns:   `flagella agent` (tests.system._support.Agent: own state dir, socket,
                  metrics port, bpf pin dir /sys/fs/bpf/flagella-sys-<pid>-mn<x>), its pods
                  (netns sys-<pid>mn_<pod>, veth into the node netns), pod CIDR
                  10.244.(200+N).0/24; the agent routes every other node's pod CIDR via that
                  node's IP, from the node records in etcd (``auto_direct_node_routes``).

etcd runs in the fabric namespace, so the agents reach it across the bridge as they would
reach a real cluster's etcd, and an outage is a ``kill`` of that process. Cross-node
packets are plain routed IPv4 (no tunnel): the receiving node's datapath derives the
source identity from its ipcache, which each agent fills from etcd (`flagella.agent.kvstore`).

Cleanup, also on failure: `MultiNode.close` deletes pods (by hand when an agent is gone),
stops the agents (their node namespaces, pins and state go with them), stops etcd and
removes its data dir, and deletes the fabric namespace with the bridge and veths.
`sweep_stale` of tests.system removes what a killed run left (the names match its pattern).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagella.datapath.port import pod_netns_name
from tests.support.etcd import EtcdServer
from tests.support.host import netns_names, sh, wait_until
from tests.system._support import Agent, free_port, remove_pod_by_hand, tcp_connect

PID = os.getpid()
FABRIC = f"sys-{PID}mn-fabric"
ETCD_IP = "10.250.0.254"
#: The Kubernetes namespace of every pod here (pod netns: ``sys-<pid>mn_<pod>``).
NAMESPACE = f"sys-{PID}mn"

ALLOW_TIMEOUT = 2.0
DENY_TIMEOUT = 0.5


@dataclass
class Pod:
    name: str
    node: Node
    ipv4: str
    labels: dict[str, str]
    ep: dict[str, Any] = field(default_factory=dict)

    @property
    def netns(self) -> str:
        return pod_netns_name(NAMESPACE, self.name)

    @property
    def identity(self) -> int:
        return int(self.ep["identity"])


@dataclass
class Node:
    index: int  # 1..
    agent: Agent
    pods: dict[str, Pod] = field(default_factory=dict)
    next_host: int = 2

    @property
    def ip(self) -> str:
        return f"10.250.0.{self.index}"

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{200 + self.index}.0/24"

    @property
    def name(self) -> str:
        return self.agent.tag

    @property
    def netns(self) -> str:
        return self.agent.node

    def cluster(self) -> dict[str, Any]:
        return dict(self.agent.call("status")["cluster"])

    def remote_endpoints(self) -> dict[str, int]:
        return dict(self.cluster()["remote_endpoints"])

    def controller(self, name: str) -> dict[str, Any]:
        return dict(next(c for c in self.agent.call("status")["controllers"] if c["name"] == name))


class MultiNode:
    def __init__(
        self, workdir: Path, nodes: int = 2, lease_ttl_s: int = 5, sync_interval_s: float = 0.5,
        shared_pod_cidr: str | None = None, proxy: bool = False, pod_netns_prefix: str = "",
    ) -> None:
        """``shared_pod_cidr``: every node gets this pod CIDR (the caller routes pods by
        /32, as the conformance runner does); ``proxy``: each agent runs its node proxy
        (Envoy, with a base id of its own); ``pod_netns_prefix``: the agents' (see
        `flagella.datapath.port.pod_netns_name`), for pods named by someone else."""
        self.workdir = workdir
        self.etcd = EtcdServer(netns=FABRIC, host=ETCD_IP)
        self.nodes: list[Node] = []
        self.prefix = f"flagella-{PID}"
        for i in range(1, nodes + 1):
            tag = f"mn{chr(ord('a') + i - 1)}"
            kvstore = (
                f"kvstore: {{backend: etcd, endpoints: ['{self.etcd.endpoint}'], node: {tag}, "
                f"lease_ttl_s: {lease_ttl_s}, timeout_s: 1.0, sync_interval_s: {sync_interval_s}, "
                f"gc_interval_s: 5, prefix: {self.prefix}/identities, cluster_prefix: {self.prefix}/cluster}}\n"
                f"pod_netns_prefix: '{pod_netns_prefix}'\n"
            )
            cidr = shared_pod_cidr or f"10.244.{200 + i}.0/24"
            # Ports and names are the node namespace's own; the Envoy base id is machine-wide.
            proxy_settings = (
                f"{{enabled: {'true' if proxy else 'false'}, ingress_port: 15301, egress_port: 15302, "
                f"envoy_base_id: {free_port()}, admin_port: 15300}}"
            )
            agent = Agent(
                workdir / tag, tag,
                network=f"{{ipv4_cidr: '{cidr}', ipv6_cidr: '', auto_direct_node_routes: true}}",
                extra_config=kvstore, proxy=proxy_settings,
            )
            self.nodes.append(Node(i, agent))

    # -- setup ---------------------------------------------------------------------------

    def start(self) -> MultiNode:
        sh("ip", "netns", "add", FABRIC)
        sh("ip", "-n", FABRIC, "link", "set", "lo", "up")
        sh("ip", "-n", FABRIC, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", FABRIC, "addr", "add", f"{ETCD_IP}/24", "dev", "br0")
        sh("ip", "-n", FABRIC, "link", "set", "br0", "up")
        for node in self.nodes:
            ns = node.netns
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            port = f"node{node.index}"
            sh("ip", "-n", FABRIC, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", FABRIC, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        self.etcd.start()
        for node in self.nodes:
            node.agent.start()
        self.wait_converged()
        return self

    def wait_converged(self, timeout: float = 30.0) -> None:
        """Until every node knows every other node and all their endpoints."""

        def converged() -> bool:
            for node in self.nodes:
                seen = node.cluster()
                if set(seen["nodes"]) != {n.name for n in self.nodes if n is not node}:
                    return False
                want = {p.ipv4: p.identity for n in self.nodes if n is not node for p in n.pods.values()}
                if {k: v for k, v in seen["remote_endpoints"].items() if k in want} != want:
                    return False
            return True

        wait_until(converged, timeout, interval=0.1, what="every node to learn the others from etcd")

    # -- pods and policy -------------------------------------------------------------------

    def create_pod(self, node: Node, name: str, **labels: str) -> Pod:
        pod = Pod(name, node, f"10.244.{200 + node.index}.{node.next_host}", labels)
        node.next_host += 1
        node.pods[name] = pod
        pod.ep = node.agent.call(
            "endpoint.create",
            {
                "name": name,
                "namespace": NAMESPACE,
                "labels": [",".join(f"{k}={v}" for k, v in sorted(labels.items()))] if labels else [],
                "ipv4": pod.ipv4,
            },
        )
        assert pod.ep["netns"] == pod.netns, pod.ep
        return pod

    def import_policy(self, node: Node, *docs: dict[str, Any]) -> None:
        r = node.agent.call("policy.import", {"documents": list(docs)})
        revision = int(r["revision"])
        wait_until(
            lambda: not node.agent.call("policy.wait", {"revision": revision})["waiting"],
            timeout=60, what=f"{node.name} to enforce revision {revision}",
        )

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> list[str]:
        problems: list[str] = []
        for node in self.nodes:
            for pod in list(node.pods.values()):
                if node.agent.alive:
                    try:
                        node.agent.call("endpoint.delete", {"name": f"{NAMESPACE}/{pod.name}"})
                    except Exception as exc:
                        problems.append(f"endpoint delete {pod.name} on {node.name}: {exc}")
                left = remove_pod_by_hand(pod.netns, node.netns)
                if left and node.agent.alive:
                    problems.append(f"left behind by {node.name}: {', '.join(left)}")
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.agent.close()
        self.etcd.close()
        if FABRIC in netns_names():
            sh("ip", "netns", "del", FABRIC, check=False)
        return problems


def connect(src: Pod | str, dst: Pod, port: int, timeout: float) -> str:
    netns = src.netns if isinstance(src, Pod) else src
    return tcp_connect(netns, dst.ipv4, port, timeout)


def assert_allowed(src: Pod | str, dst: Pod, port: int, within: float = 10.0) -> None:
    """Allowed: the connection opens (retried while the cluster state propagates)."""
    wait_until(
        lambda: connect(src, dst, port, ALLOW_TIMEOUT) == "open", within, interval=0.1,
        what=f"{getattr(src, 'name', src)} -> {dst.name}:{port} to open",
    )


def assert_denied(src: Pod | str, dst: Pod, port: int) -> None:
    got = connect(src, dst, port, DENY_TIMEOUT)
    assert got == "timeout", f"{getattr(src, 'name', src)} -> {dst.name}:{port}: {got}, expected a drop"


def cnp(name: str, selector: dict[str, str], ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"endpointSelector": {"matchLabels": selector}, "ingress": ingress},
    }


def from_endpoints(labels: dict[str, str], port: int) -> dict[str, Any]:
    return {
        "fromEndpoints": [{"matchLabels": labels}],
        "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}],
    }
