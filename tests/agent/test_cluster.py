"""Cluster mode of the agent core: two nodes' cores share ipcache entries through a real etcd.

Each node is an `AgentCore` over the in-memory datapath twin with an `EtcdBackend` of its
own node name; `ClusterSync.run` is the ``kvstore-sync`` controller's body. The kernel
datapath, traffic and node namespaces are covered in tests/multinode.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from flagella.agent.core import AgentCore
from flagella.agent.kvstore import ClusterSync
from flagella.agent.settings import AgentSettings, KvstoreSettings, NetworkSettings
from flagella.datapath.port import MemoryDatapath
from flagella.identity import EtcdBackend, KvstoreUnavailable
from flagella.identity._etcd_client import EtcdClient, delete, put
from flagella.ipcache import REMOTE_NODE_IDENTITY
from tests.support.etcd import EtcdServer

net = ipaddress.ip_network


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    server = EtcdServer()
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        pytest.fail(str(exc))
    yield server
    server.close()


class Node:
    def __init__(self, tmp: Path, etcd: EtcdServer, prefix: str, name: str, n: int) -> None:
        kv = KvstoreSettings(
            backend="etcd", endpoints=(etcd.endpoint,), node=name, timeout_s=1.0,
            prefix=f"{prefix}/identities", cluster_prefix=f"{prefix}/cluster",
        )
        self.settings = AgentSettings(
            state_dir=str(tmp / name), metrics_addr="", kvstore=kv,
            network=NetworkSettings(ipv4_cidr=f"10.244.{n}.0/24", ipv6_cidr="", auto_direct_node_routes=True),
        ).validate()
        self.dp = MemoryDatapath()
        self.dp.host = [ipaddress.ip_address(f"10.250.0.{n}")]
        self.backend = EtcdBackend(
            kv.endpoints, node=name, prefix=kv.prefix, lease_ttl_s=kv.lease_ttl_s, timeout_s=kv.timeout_s
        )
        self.core = AgentCore(self.settings, self.dp, self.backend)
        self.core.restore()
        self.sync = ClusterSync(self.backend, kv.cluster_prefix)

    def run_sync(self) -> None:
        self.sync.run(self.core.apply_cluster, lambda fn: fn(), self.core.cluster_entries)
        assert self.core.wait_idle(10) == []

    def close(self) -> None:
        self.core.close()
        self.backend.close()


@pytest.fixture
def nodes(tmp_path: Path, etcd: EtcdServer) -> Iterator[Callable[[str, int], Node]]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    made: list[Node] = []

    def make(name: str, n: int) -> Node:
        node = Node(tmp_path, etcd, prefix, name, n)
        made.append(node)
        return node

    yield make
    if etcd.proc is None:
        etcd.start()
    for node in made:
        node.close()


SERVER_POLICY = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "server", "namespace": "default"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "server"}},
        "ingress": [
            {
                "fromEndpoints": [{"matchLabels": {"app": "client"}}],
                "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
            }
        ],
    },
}


def ingress_peers(node: Node, ep_id: int) -> set[int]:
    return {k.identity for k in node.dp.policy if k.ep_id == ep_id and not k.egress and k.port == 80}


def test_remote_endpoints_and_nodes_reach_the_ipcache_and_policy(nodes: Callable[[str, int], Node]) -> None:
    a, b = nodes("node-a", 1), nodes("node-b", 2)
    client = a.core.create_endpoint("client", labels={"app": "client"})
    other = a.core.create_endpoint("other", labels={"app": "other"})
    server = b.core.create_endpoint("server", labels={"app": "server"})
    b.core.import_policies([SERVER_POLICY])
    assert b.core.wait_idle(10) == []
    assert client.identity not in ingress_peers(b, server.id)  # B has not heard of it yet

    a.run_sync()
    b.run_sync()
    a.run_sync()
    # B: A's pods under their identities, A's node IP as remote-node; and the reverse.
    assert b.dp.ipcache[net(f"{client.ipv4}/32")] == client.identity
    assert b.dp.ipcache[net(f"{other.ipv4}/32")] == other.identity
    assert b.dp.ipcache[net("10.250.0.1/32")] == REMOTE_NODE_IDENTITY
    assert a.dp.ipcache[net(f"{server.ipv4}/32")] == server.identity
    assert a.dp.ipcache[net("10.250.0.2/32")] == REMOTE_NODE_IDENTITY
    assert ingress_peers(b, server.id) == {client.identity}
    status = b.core.status()["cluster"]
    assert status["nodes"] == {"node-a": {"ips": ["10.250.0.1"], "pod_cidrs": ["10.244.1.0/24"]}}
    assert b.dp.node_routes == {net("10.244.1.0/24"): ipaddress.ip_address("10.250.0.1")}
    assert a.dp.node_routes == {net("10.244.2.0/24"): ipaddress.ip_address("10.250.0.2")}

    # A pod deleted on A leaves B's ipcache and policy.
    a.core.delete_endpoint("client")
    a.run_sync()
    b.run_sync()
    assert net(f"{client.ipv4}/32") not in b.dp.ipcache
    assert ingress_peers(b, server.id) == set()
    assert b.dp.ipcache[net(f"{other.ipv4}/32")] == other.identity


def test_outage_keeps_the_cache_and_catches_up(nodes: Callable[[str, int], Node], etcd: EtcdServer) -> None:
    a, b = nodes("node-a", 1), nodes("node-b", 2)
    client = a.core.create_endpoint("client", labels={"app": "client"})
    server = b.core.create_endpoint("server", labels={"app": "server"})
    b.core.import_policies([SERVER_POLICY])
    for node in (a, b, a):
        node.run_sync()
    before = dict(b.dp.ipcache)

    etcd.kill()
    with pytest.raises(KvstoreUnavailable):
        b.run_sync()
    assert b.dp.ipcache == before  # nothing forgotten
    assert ingress_peers(b, server.id) == {client.identity}
    # A pod whose identity A already holds is created from the cache.
    client2 = a.core.create_endpoint("client2", labels={"app": "client"})
    assert client2.identity == client.identity

    etcd.start()
    assert a.backend.wait_online(15) and b.backend.wait_online(15)
    a.run_sync()
    b.run_sync()
    assert b.dp.ipcache[net(f"{client2.ipv4}/32")] == client.identity


def test_own_keys_are_restored_when_deleted_by_hand(nodes: Callable[[str, int], Node], etcd: EtcdServer) -> None:
    a = nodes("node-a", 1)
    ep = a.core.create_endpoint("client", labels={"app": "client"})
    a.run_sync()
    key = f"{a.sync.prefix}/ip/node-a/{ep.ipv4}"
    assert any(k == key for k, _v, _l in a.sync.read())

    async def drop(client: EtcdClient, _lease: int) -> object:
        return await client.txn([], [delete(key)], [])

    a.backend.session(drop)
    assert not any(k == key for k, _v, _l in a.sync.read())
    a.run_sync()
    rows = {k: lease for k, _v, lease in a.sync.read()}
    assert rows[key] == a.backend.lease


def test_garbage_in_the_prefix_is_skipped_and_named(nodes: Callable[[str, int], Node]) -> None:
    a, b = nodes("node-a", 1), nodes("node-b", 2)
    a.core.create_endpoint("client", labels={"app": "client"})
    a.run_sync()
    async def junk(client: EtcdClient, lease: int) -> None:
        await client.txn([], [
            put(f"{b.sync.prefix}/ip/evil/10.244.9.9", '{"identity": 1}', lease),
            put(f"{b.sync.prefix}/ip/evil/not-an-ip", '{"identity": 300}', lease),
        ], [])

    a.backend.session(junk)
    b.run_sync()
    errors = b.core.status()["cluster"]["errors"]
    assert any("10.244.9.9" in e and "reserved" in e for e in errors), errors
    assert any("not-an-ip" in e for e in errors), errors
    assert net("10.244.9.9/32") not in b.dp.ipcache
    assert any(ident >= 256 for ident in b.dp.ipcache.values())  # A's client still arrived


def test_settings_reject_a_bad_cluster_prefix() -> None:
    from flagella.errors import InputError

    kv = KvstoreSettings(backend="etcd", endpoints=("http://127.0.0.1:1",), cluster_prefix="flagella/identities")
    with pytest.raises(InputError, match="kvstore.cluster_prefix"):
        replace(AgentSettings(), kvstore=kv).validate()
    with pytest.raises(InputError, match="kvstore.sync_interval_s"):
        replace(AgentSettings(), kvstore=replace(kv, cluster_prefix="c", sync_interval_s=0)).validate()



def test_a_reused_identity_number_is_relearned(nodes: Callable[[str, int], Node]) -> None:
    """Identity numbers are reused: B must not keep what a number meant before."""
    a, b = nodes("node-a", 1), nodes("node-b", 2)
    server = b.core.create_endpoint("server", labels={"app": "server"})
    b.core.import_policies([SERVER_POLICY])
    old = a.core.create_endpoint("other", labels={"app": "other"})
    for node in (a, b):
        node.run_sync()
    assert ingress_peers(b, server.id) == set()
    a.core.delete_endpoint("other")  # the last holder: the number is free again
    client = a.core.create_endpoint("client", labels={"app": "client"})
    assert client.identity == old.identity  # lowest free: the same number, other labels
    for node in (a, b):
        node.run_sync()
    assert b.dp.ipcache[net(f"{client.ipv4}/32")] == client.identity
    assert ingress_peers(b, server.id) == {client.identity}


def test_four_agents_race_for_identities_and_agree_on_the_ipcache(nodes: Callable[[str, int], Node]) -> None:
    """Four agents create pods at once, with label sets that overlap across nodes: the same
    labels get the same number everywhere, different ones never share one, and every node
    maps every other node's pods to those numbers."""
    import threading

    agents = [nodes(f"node-{i}", i) for i in range(1, 5)]
    start = threading.Barrier(len(agents))
    errors: list[BaseException] = []

    def create(node: Node, i: int) -> None:
        try:
            start.wait()
            for j in range(12):
                # app=shared-N on every node; app=own-<node>-N on this one only
                labels = {"app": f"shared-{j % 6}"} if j % 2 == 0 else {"app": f"own-{i}-{j}"}
                node.core.create_endpoint(f"p{j}", labels=labels)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(n, i)) for i, n in enumerate(agents, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    by_labels: dict[str, set[int]] = {}
    for node in agents:
        for ep in node.core.endpoints.values():
            by_labels.setdefault(ep.labels["app"], set()).add(ep.identity)
    assert all(len(ids) == 1 for ids in by_labels.values()), by_labels
    numbers = [next(iter(ids)) for ids in by_labels.values()]
    assert len(numbers) == len(set(numbers)), "two label sets share an identity"
    for _ in range(2):
        for node in agents:
            node.run_sync()
    for node in agents:
        for other in agents:
            if other is node:
                continue
            for ep in other.core.endpoints.values():
                assert node.dp.ipcache[net(f"{ep.ipv4}/32")] == ep.identity


def test_a_quiet_run_stops_after_two_small_reads_and_any_change_reads_again(nodes: Callable[[str, int], Node]) -> None:
    """The kvstore-sync run reads and diffs the whole prefix only when something changed:
    another node's put, a key deleted by hand (as an expired lease does), or a pod of its
    own. Otherwise two small reads tell it nothing did, and it stops."""
    a, b = nodes("node-a", 1), nodes("node-b", 2)
    b.core.create_endpoint("client", labels={"app": "client"})
    b.run_sync()

    def full_reads_of(run: Callable[[], None]) -> int:
        before = a.sync.full_reads
        run()
        return a.sync.full_reads - before

    a.run_sync()
    a.run_sync()  # its own first publish is a change it reads back once
    assert full_reads_of(a.run_sync) == 0 and a.sync.skipped >= 1

    server = b.core.create_endpoint("server", labels={"app": "server"})
    b.run_sync()
    assert full_reads_of(a.run_sync) == 1  # another node's put
    assert a.dp.ipcache[net(f"{server.ipv4}/32")] == server.identity
    assert full_reads_of(a.run_sync) == 0

    key = f"{a.sync.prefix}/ip/node-b/{server.ipv4}"

    async def drop(client: EtcdClient, _lease: int) -> object:
        return await client.txn([], [delete(key)], [])

    a.backend.session(drop)
    assert full_reads_of(a.run_sync) == 1  # a delete: the count moved
    assert net(f"{server.ipv4}/32") not in a.dp.ipcache

    a.core.create_endpoint("own", labels={"app": "own"})
    assert full_reads_of(a.run_sync) == 1  # its own keys are not what it published
    # An etcd restored to an older revision (a backup) is a change too.
    assert a.sync.changed_since(10**12, len(a.sync.read()))
    assert any(k.startswith(f"{a.sync.prefix}/ip/node-a/") for k, _v, _l in a.sync.read())
