"""One contract, two datapaths: the agent over the in-memory twin and over the kernel.

The same tests drive both through the agent's socket API: create endpoints, import
policy (``--wait``), delete, drift repair by the sync controller, conntrack GC. Only
three things differ per backend, behind `Backend`: how pods are made, how a map is
damaged behind the agent's back, and how a flow comes to exist and to expire (the
twin's entries are written and its clock moved; the kernel's come from real
datagrams and expire in real time).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flagella.datapath.entries import PolicyKey
from flagella.datapath.port import CTRow
from tests.agent.inprocess import InProcessAgent
from tests.system._support import (
    Agent,
    Cluster,
    Pod,
    bpftool_dump,
    cnp_ingress,
    hex_bytes,
    namespace,
    pod_socket,
    sh,
    wait_until,
)

PORT = 7400


class Backend:
    name: str

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError

    def create(self, name: str, labels: dict[str, str], n: int) -> dict[str, Any]:
        raise NotImplementedError

    def namespace(self) -> str:
        raise NotImplementedError

    def delete(self, ep: dict[str, Any]) -> None:
        self.call("endpoint.delete", {"name": ep["id"]})

    def damage_policy(self, ep_id: int) -> None:
        """Delete one policy entry of the endpoint behind the agent's back."""
        raise NotImplementedError

    def make_flow(self, src: dict[str, Any], dst: dict[str, Any]) -> None:
        """A UDP flow from ``src`` to ``dst`` that expires soon."""
        raise NotImplementedError

    def let_flows_expire(self) -> None:
        raise NotImplementedError


class MemoryBackend(Backend):
    name = "memory"

    def __init__(self, tmp: Path) -> None:
        from flagella.agent.settings import ConntrackSettings, ControllerSettings

        self.agent = InProcessAgent(
            tmp,
            controllers=ControllerSettings(sync_interval_s=0.2),
            conntrack=ConntrackSettings(non_tcp_s=1, gc_interval_non_tcp_s=0.2),
        )

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.agent.call(method, params)

    def namespace(self) -> str:
        return "contract"

    def create(self, name: str, labels: dict[str, str], n: int) -> dict[str, Any]:
        return self.call("endpoint.create", {
            "name": name, "namespace": self.namespace(),
            "labels": [",".join(f"{k}={v}" for k, v in labels.items())],
            "ipv4": f"10.244.200.{n}",
        })

    def damage_policy(self, ep_id: int) -> None:
        key = next(k for k in self.agent.dp.policy if k.ep_id == ep_id)
        del self.agent.dp.policy[key]

    def make_flow(self, src: dict[str, Any], dst: dict[str, Any]) -> None:
        a, b = ipaddress.ip_address(src["ipv4"]), ipaddress.ip_address(dst["ipv4"])
        expires = self.agent.dp.clock_ns + 1_000_000_000
        self.agent.dp.ct.append(CTRow(src["id"], True, 17, a, b, 40000, PORT, expires, 1, 60, 0))

    def let_flows_expire(self) -> None:
        self.agent.dp.clock_ns += 2_000_000_000

    def close(self) -> None:
        self.agent.close()


class KernelBackend(Backend):
    name = "kernel"

    def __init__(self, make_agent: Callable[..., Agent], make_cluster: Callable[[Agent], Cluster]) -> None:
        self.agent = make_agent("ct", sync_interval_s=0.2, start=False)
        with open(self.agent.config, "a") as f:
            f.write("conntrack: {non_tcp_s: 1, gc_interval_non_tcp_s: 0.2}\n")
        self.agent.start()
        self.cluster = make_cluster(self.agent)
        self.pods: dict[int, Pod] = {}

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.agent.call(method, params or {})

    def namespace(self) -> str:
        return namespace("ct")

    def create(self, name: str, labels: dict[str, str], n: int) -> dict[str, Any]:
        pod = self.cluster.create(name, self.namespace(), n, labels)
        self.pods[pod.ep["id"]] = pod
        return pod.ep

    def delete(self, ep: dict[str, Any]) -> None:
        self.cluster.delete(self.pods.pop(ep["id"]))

    def damage_policy(self, ep_id: int) -> None:
        for row in bpftool_dump(self.agent, "policy"):
            key = hex_bytes(row["key"])
            if struct.unpack("<I", bytes(int(b, 16) for b in key[:4]))[0] == ep_id:
                sh("bpftool", "map", "delete", "pinned", str(self.agent.bpf_dir / "policy"), "key", "hex", *key)
                return
        raise AssertionError(f"endpoint {ep_id} has no policy entry to damage")

    def make_flow(self, src: dict[str, Any], dst: dict[str, Any]) -> None:
        s = pod_socket(src["netns"], socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"contract", (dst["ipv4"], PORT))
        finally:
            s.close()

    def let_flows_expire(self) -> None:
        pass  # real time: non-TCP entries live one second

    def close(self) -> None:
        pass  # the fixtures remove the pods and the agent


@pytest.fixture(params=["memory", pytest.param("kernel", marks=[pytest.mark.root, pytest.mark.timeout(180)])])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b: Backend
    if request.param == "memory":
        b = MemoryBackend(tmp_path)
    else:
        b = KernelBackend(request.getfixturevalue("make_agent"), request.getfixturevalue("make_cluster"))
    try:
        yield b
    finally:
        b.close()  # type: ignore[attr-defined]


def trio(b: Backend) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    server = b.create("server", {"app": "server"}, 10)
    client = b.create("client", {"app": "client"}, 11)
    intruder = b.create("intruder", {"app": "intruder"}, 12)
    return server, client, intruder


def import_and_wait(b: Backend, *docs: dict[str, Any]) -> int:
    revision = int(b.call("policy.import", {"documents": list(docs)})["revision"])
    w = b.call("policy.wait", {"revision": revision, "timeout": 30})
    assert w["lagging"] == [], w
    return revision


def policy_rows(b: Backend, ep: dict[str, Any]) -> list[dict[str, Any]]:
    return list(b.call("bpf.policy", {"name": ep["id"]}))


def ipcache(b: Backend) -> dict[str, int]:
    return {r["prefix"]: r["identity"] for r in b.call("bpf.ipcache")}


def test_create_then_policy_is_enforced_for_the_selected_peer_only(backend: Backend) -> None:
    server, client, intruder = trio(backend)
    ns = backend.namespace()
    revision = import_and_wait(backend, cnp_ingress("contract", ns, {"app": "server"}, {"app": "client"}, [(PORT, "TCP")]))
    rows = policy_rows(backend, server)
    allowed = [r for r in rows if r["identity"] == client["identity"] and r["direction"] == "ingress"]
    assert [(r["protocol"], r["ports"], r["verdict"]) for r in allowed] == [(6, str(PORT), "allow")]
    assert not [r for r in rows if r["identity"] == intruder["identity"]]
    got = backend.call("endpoint.get", {"name": server["id"]})
    assert got["state"] == "ready" and got["policy_revision"] >= revision
    assert got["policy_enforcement"] == {"ingress": True, "egress": False}
    cache = ipcache(backend)
    for ep in (server, client, intruder):
        assert cache[f"{ep['ipv4']}/32"] == ep["identity"]


def test_delete_leaves_no_entry_and_no_address_behind(backend: Backend) -> None:
    server, client, _ = trio(backend)
    ns = backend.namespace()
    import_and_wait(backend, cnp_ingress("contract", ns, {"app": "server"}, {"app": "client"}, [(PORT, "TCP")]))
    backend.delete(client)
    assert not [r for r in policy_rows(backend, server) if r["identity"] == client["identity"]]
    assert f"{client['ipv4']}/32" not in ipcache(backend)
    with pytest.raises(Exception, match="not found"):
        backend.call("endpoint.get", {"name": client["id"]})


def test_the_sync_controller_repairs_a_damaged_policy_map_and_counts_it(backend: Backend) -> None:
    server, _, _ = trio(backend)
    ns = backend.namespace()
    import_and_wait(backend, cnp_ingress("contract", ns, {"app": "server"}, {"app": "client"}, [(PORT, "TCP")]))
    before = policy_rows(backend, server)
    repairs = backend.call("status")["repairs"].get("policy", 0)
    backend.damage_policy(server["id"])
    wait_until(lambda: len(policy_rows(backend, server)) == len(before), timeout=10, what="the repair")
    assert [(r["identity"], r["ports"], r["verdict"]) for r in policy_rows(backend, server)] == [
        (r["identity"], r["ports"], r["verdict"]) for r in before
    ]
    assert backend.call("status")["repairs"]["policy"] > repairs


def test_conntrack_gc_deletes_expired_flows(backend: Backend) -> None:
    server, client, _ = trio(backend)

    def flows() -> list[dict[str, Any]]:
        return [
            r for r in backend.call("bpf.ct")
            if r["proto"] == 17 and r["dst"] == f"{server['ipv4']}:{PORT}"
        ]

    backend.make_flow(client, server)
    wait_until(flows, timeout=5, what="the flow's conntrack entry")
    backend.let_flows_expire()
    wait_until(lambda: not flows(), timeout=10, what="conntrack GC of the expired flow")


def test_policy_keys_have_one_shape_in_both_datapaths(backend: Backend) -> None:
    """What bpf.policy reports is built from the one PolicyKey, whichever map holds it."""
    server, client, _ = trio(backend)
    import_and_wait(backend, cnp_ingress("contract", backend.namespace(), {"app": "server"}, {"app": "client"}, [(PORT, "TCP")]))
    row = next(r for r in policy_rows(backend, server) if r["identity"] == client["identity"])
    key = PolicyKey(server["id"], client["identity"], row["direction"] == "egress", row["protocol"], PORT, 0)
    assert key.direction.name.lower() == row["direction"]
