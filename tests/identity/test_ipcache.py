import ipaddress

import pytest

from flagella.ipcache import desired_ipcache


def test_endpoint_addresses_override_host_and_cidr_entries():
    net = ipaddress.ip_network
    addr = ipaddress.ip_address
    out = desired_ipcache(
        {net("10.244.0.0/16"): 300, net("198.51.100.0/24"): 301},
        [addr("192.0.2.1"), addr("10.244.0.9")],
        [(addr("10.244.0.9"), 400), (addr("fd00:10:244::9"), 400)],
    )
    assert out[net("10.244.0.0/16")] == 300
    assert out[net("192.0.2.1/32")] == 1
    assert out[net("10.244.0.9/32")] == 400
    assert out[net("fd00:10:244::9/128")] == 400


# -- cluster mode: the other nodes' entries -------------------------------------------

import json  # noqa: E402

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flagella.errors import InputError  # noqa: E402
from flagella.ipcache import REMOTE_NODE_IDENTITY, ClusterState, NodeRecord  # noqa: E402

PREFIX = "flagella/cluster"
NODES = ["local", "n1", "n2"]
ADDRS = [f"10.244.{i}.{j}" for i in (1, 2) for j in (1, 2, 3)] + ["fd00:10:244::1", "10.250.0.1"]


def node_pair(node: str, ips: list[str]) -> tuple[str, str]:
    return f"{PREFIX}/nodes/{node}", NodeRecord(node, tuple(ipaddress.ip_address(i) for i in ips)).to_json()


def ip_pair(node: str, addr: str, ident: int) -> tuple[str, str]:
    return f"{PREFIX}/ip/{node}/{addr}", json.dumps({"identity": ident})


reads = st.lists(
    st.one_of(
        st.builds(node_pair, st.sampled_from(NODES), st.lists(st.sampled_from(ADDRS), max_size=2)),
        st.builds(ip_pair, st.sampled_from(NODES), st.sampled_from(ADDRS), st.integers(256, 260)),
    ),
    max_size=8,
).map(lambda pairs: list(dict(pairs).items()))  # a read has each key once


@given(st.lists(reads, min_size=1, max_size=6))
def test_cluster_state_diffs_equal_fresh_reads(sequence: list[list[tuple[str, str]]]) -> None:
    state = ClusterState("local", PREFIX)
    before: dict[object, int] = {}
    for pairs in sequence:
        change = state.replace(pairs)
        fresh = ClusterState("local", PREFIX)
        fresh.replace(pairs)
        after = state.remote_ipcache()
        assert after == fresh.remote_ipcache()
        assert change.prefixes == {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
        # Exactly the other nodes' addresses come back; this node's own entries never do.
        remote: set[object] = set()
        for key, value in pairs:
            kind, node, *rest = key[len(PREFIX) + 1 :].split("/")
            if node != "local":
                addrs = rest if kind == "ip" else json.loads(value)["ips"]
                remote |= {ipaddress.ip_network(a) for a in addrs}
        assert set(after) == remote
        before = after


def test_node_ips_are_remote_node_and_endpoints_win_over_them() -> None:
    state = ClusterState("local", PREFIX)
    change = state.replace([
        node_pair("n1", ["10.250.0.1", "10.244.1.1"]),
        ip_pair("n1", "10.244.1.1", 300),
        ip_pair("n2", "10.244.2.2", 301),
        ip_pair("n1", "10.244.2.2", 302),  # two nodes claim one address: n1 sorts first
        ip_pair("local", "10.244.3.3", 303),
    ])
    net = ipaddress.ip_network
    assert state.remote_ipcache() == {
        net("10.250.0.1/32"): REMOTE_NODE_IDENTITY,
        net("10.244.1.1/32"): 300,
        net("10.244.2.2/32"): 302,
    }
    assert change.nodes_added == {"n1"}
    assert set(state.identities()) == {300, 301, 302}


def test_desired_ipcache_precedence_with_remote_entries() -> None:
    net = ipaddress.ip_network
    addr = ipaddress.ip_address
    out = desired_ipcache(
        {net("10.244.1.0/24"): 400, net("10.244.1.9/32"): 401},
        [addr("10.250.0.2")],
        [(addr("10.244.2.9"), 500)],
        {net("10.244.1.9/32"): 300, net("10.250.0.2/32"): 6, net("10.244.2.9/32"): 301},
    )
    assert out[net("10.244.1.9/32")] == 300  # remote pod beats a policy CIDR naming it
    assert out[net("10.244.1.0/24")] == 400
    assert out[net("10.250.0.2/32")] == 1  # our own address stays host
    assert out[net("10.244.2.9/32")] == 500  # a local endpoint beats a remote claim


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        (f"{PREFIX}/ip/n1/10.0.0.1", '{"identity": 1}', "reserved for hosts"),
        (f"{PREFIX}/ip/n1/10.0.0.1", '{"identity": 6}', "reserved for hosts"),
        (f"{PREFIX}/ip/n1/10.0.0.1", '{"identity": 70000}', ".identity: must be"),
        (f"{PREFIX}/ip/n1/10.0.0.1", "{", "not JSON"),
        (f"{PREFIX}/ip/n1/nope", '{"identity": 300}', "'nope' is not an IP address"),
        (f"{PREFIX}/nodes/n1", '{"name": "n2"}', "is not the key's node"),
        (f"{PREFIX}/nodes/n1", '{"name": "n1", "ips": ["x"]}', ".ips[0]: 'x' is not an IP"),
        (f"{PREFIX}/nodes/n1", '{"name": "n1", "pod_cidrs": ["10.0.0.1/33"]}', ".pod_cidrs[0]"),
        (f"{PREFIX}/other/n1", "{}", "unknown key"),
        (f"{PREFIX}/ip/n1/10.0.0.1", '{"identity": 300, "named_ports": {"http": [[0, 6]]}}', ".named_ports.http[0]"),
        (f"{PREFIX}/ip/n1/10.0.0.1", '{"identity": 300, "labels": 5}', ".labels: must be"),
    ],
)
def test_bad_entries_are_skipped_with_an_error_naming_them(key: str, value: str, error: str) -> None:
    state = ClusterState("local", PREFIX)
    state.replace([(key, value), ip_pair("n2", "10.244.2.2", 301)])
    assert len(state.errors) == 1 and error in state.errors[0] and key in state.errors[0], state.errors
    assert state.remote_ipcache() == {ipaddress.ip_network("10.244.2.2/32"): 301}


@given(st.text(max_size=200))
def test_node_record_parser_fuzz(text: str) -> None:
    try:
        record = NodeRecord.from_json(text, "k")
    except InputError as exc:
        assert str(exc).startswith("k")
    else:
        assert NodeRecord.from_json(record.to_json(), "k") == record


def test_node_routes_point_each_remote_pod_cidr_at_its_node() -> None:
    net, addr = ipaddress.ip_network, ipaddress.ip_address
    state = ClusterState("local", PREFIX)

    def node(name: str, ips: list[str], cidrs: list[str]) -> tuple[str, str]:
        rec = NodeRecord(name, tuple(addr(i) for i in ips), tuple(net(c) for c in cidrs))
        return f"{PREFIX}/nodes/{name}", rec.to_json()

    state.replace([
        node("n1", ["10.250.0.1", "fd00:250::1"], ["10.244.1.0/24", "fd00:10:244:1::/64"]),
        node("n2", ["10.250.0.2"], ["10.244.2.0/24", "fd00:10:244:2::/64"]),  # no IPv6 node IP
        node("n3", ["10.250.0.3"], ["10.244.0.0/16"]),  # overlaps ours: never routed away
        node("n0", ["10.250.0.9"], ["10.244.2.0/24"]),  # claims n2's CIDR: n0 sorts first
    ])
    assert state.node_routes([net("10.244.3.0/24")]) == {
        net("10.244.1.0/24"): addr("10.250.0.1"),
        net("fd00:10:244:1::/64"): addr("fd00:250::1"),
        net("10.244.2.0/24"): addr("10.250.0.9"),
    }


def test_extras_carry_remote_addresses_and_named_ports_per_identity() -> None:
    state = ClusterState("local", PREFIX)
    web = json.dumps({"identity": 300, "labels": "k8s:app=web", "named_ports": {"http": [[8080, 6]]}})
    state.replace([
        (f"{PREFIX}/ip/n1/10.244.1.5", web),
        (f"{PREFIX}/ip/n2/10.244.2.5", json.dumps({"identity": 300, "labels": "k8s:app=web"})),
        node_pair("n1", ["10.250.0.1"]),
    ])
    addr = ipaddress.ip_address
    assert state.extras() == {300: (frozenset({addr("10.244.1.5"), addr("10.244.2.5")}), {"http": frozenset({(8080, 6)})})}
    assert state.identities() == {300: "k8s:app=web"}
