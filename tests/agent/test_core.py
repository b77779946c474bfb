"""AgentCore over the in-memory datapath twin: lifecycle, regeneration, drift, crashes."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from flagella.agent.core import AgentCore
from flagella.agent.settings import AgentSettings
from flagella.datapath.entries import PolicyKey
from flagella.datapath.port import MemoryDatapath
from flagella.endpoint import State
from flagella.errors import InputError, PolicyValidationError

L3L4 = yaml.safe_load("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1, namespace: default}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")


@pytest.fixture
def dp():
    return MemoryDatapath()


@pytest.fixture
def core(tmp_path, dp):
    c = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    c.restore()
    yield c
    c.close()


def realized(core: AgentCore, revision: int) -> int:
    """Wait until every endpoint realized ``revision`` (policy import --wait)."""
    assert core.wait_for_revision(revision, timeout=30) == []
    return revision


def entries_for(dp: MemoryDatapath, ep_id: int) -> dict[PolicyKey, object]:
    return {k: v for k, v in dp.policy.items() if k.ep_id == ep_id}


def starwars(core):
    ds = core.create_endpoint("deathstar", labels={"org": "empire", "class": "deathstar"})
    tf = core.create_endpoint("tiefighter", labels={"org": "empire", "class": "tiefighter"})
    xw = core.create_endpoint("xwing", labels={"org": "alliance", "class": "xwing"})
    return ds, tf, xw


def test_create_endpoint_enforces_before_returning(core, dp):
    ds, tf, xw = starwars(core)
    assert ds.state == State.READY and ds.ifindex in dp.attached
    assert dp.endpoints[ds.ifindex].identity == ds.identity
    assert dp.ipcache[ipaddress.ip_network(ds.ipv4)] == ds.identity
    assert len({ds.identity, tf.identity, xw.identity}) == 3
    assert ds.ipv4 in ipaddress.ip_network("10.244.0.0/24")


def test_policy_import_regenerates_and_reports_revision(core, dp):
    ds, tf, xw = starwars(core)
    before = core.engine.revision
    rev = realized(core, core.import_policies([L3L4]))
    assert rev == before + 1
    row = dp.endpoints[ds.ifindex]
    assert row.enforce_ingress
    keys = entries_for(dp, ds.id)
    assert any(k.identity == tf.identity and k.port == 80 and k.protocol == 6 for k in keys)
    assert not any(k.identity == xw.identity for k in keys)
    assert ds.policy_revision == rev


def test_bad_policy_imports_nothing(core, dp):
    starwars(core)
    bad = yaml.safe_load(yaml.safe_dump(L3L4))
    bad["metadata"]["name"] = "other"
    bad["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "99999"
    rev = core.engine.revision
    with pytest.raises(PolicyValidationError) as exc:
        core.import_policies([L3L4, bad])
    assert "port" in str(exc.value)
    assert core.engine.revision == rev and not core.engine.policies


def test_label_change_moves_identity_and_peers_follow(core, dp):
    ds, tf, xw = starwars(core)
    realized(core, core.import_policies([L3L4]))
    old = xw.identity
    core.set_endpoint_labels("xwing", {"org": "empire"}, [])
    assert xw.identity != old
    assert any(k.identity == xw.identity for k in entries_for(dp, ds.id))
    assert dp.ipcache[ipaddress.ip_network(xw.ipv4)] == xw.identity


def test_namespace_labels_change_identities(core):
    ds, _, _ = starwars(core)
    old = ds.identity
    core.set_namespace_labels("default", {"team": "blue"}, [])
    assert ds.identity != old
    assert ds.namespace_labels == {"team": "blue"}


def test_delete_leaves_nothing_behind(core, dp):
    ds, tf, xw = starwars(core)
    realized(core, core.import_policies([L3L4]))
    core.delete_endpoint("deathstar")
    assert ds.netns not in dp.pods
    assert ds.ifindex not in dp.endpoints and not entries_for(dp, ds.id)
    assert ipaddress.ip_network(ds.ipv4) not in dp.ipcache
    assert core.allocator.lookup(core._security_labels(ds)) is None


def test_sync_repairs_drift_and_counts_it(core, dp):
    ds, tf, _ = starwars(core)
    realized(core, core.import_policies([L3L4]))
    key = next(iter(entries_for(dp, ds.id)))
    value = dp.policy.pop(key)
    stray = PolicyKey(ds.id, 4242, False, 6, 22, 0)
    dp.policy[stray] = value
    assert core.sync_all() == 2
    assert dp.policy[key] == value and stray not in dp.policy
    assert core.kernel.repairs["policy"] == 2
    assert core.sync_all() == 0


def test_sync_reattaches_detached_programs_and_counts_it(core, dp):
    ds, tf, _ = starwars(core)
    assert core.sync_all() == 0
    dp.detach(ds.ifindex)  # `tc filter del`, `bpftool link detach`: enforcement is off
    assert core.sync_all() == 2
    assert ds.ifindex in dp.attached
    assert core.stats.attach_repairs == {"from_pod": 1, "to_pod": 1}
    assert core.status()["attach_repairs"] == {"from_pod": 1, "to_pod": 1}
    assert core.sync_all() == 0


def test_pod_netns_names_never_collide(core, dp):
    """``b-c`` in ``x`` and ``c`` in ``x-b`` were both ``x-b-c``: the second took the first over."""
    first = core.create_endpoint("b-c", namespace="x", labels={"app": "one"})
    second = core.create_endpoint("c", namespace="x-b", labels={"app": "two"})
    assert first.netns != second.netns and first.ifindex != second.ifindex
    assert dp.pods[first.netns].ipv4 == first.ipv4 and dp.pods[second.netns].ipv4 == second.ipv4
    core.delete_endpoint("x-b/c")
    assert first.netns in dp.pods and core.find("x/b-c").state == State.READY


@pytest.mark.parametrize(
    ("namespace", "name"),
    [("x", "b-c"), ("x-b", "c"), ("x.b", "c"), ("a" * 63, "b" * 63), ("a" * 63, "b" * 62 + "c")],
)
def test_pod_netns_name_is_a_valid_netns_name(namespace, name):
    from flagella.datapath.port import pod_netns_name

    got = pod_netns_name(namespace, name)
    assert 1 <= len(got) <= 64 and got.count("_") in (1, 3)


def test_pod_netns_name_is_injective_on_dns_labels():
    from hypothesis import given
    from hypothesis import strategies as st

    from flagella.datapath.port import pod_netns_name

    label = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?", fullmatch=True)

    @given(label, label, label, label)
    def check(ns1, n1, ns2, n2):
        if (ns1, n1) != (ns2, n2):
            assert pod_netns_name(ns1, n1) != pod_netns_name(ns2, n2)

    check()


def test_create_refuses_a_netns_it_did_not_make_and_touches_nothing(core, dp):
    from flagella.datapath.port import pod_netns_name

    dp.foreign.add(pod_netns_name("default", "web"))
    records_before = {e.id for e in core.store.load_all()}
    identities_before = dict(core.allocator.all())
    with pytest.raises(InputError, match="already exists"):
        core.create_endpoint("web", labels={"app": "web"})
    assert not core.endpoints and not dp.pods
    assert {e.id for e in core.store.load_all()} == records_before
    assert dict(core.allocator.all()) == identities_before


def test_restart_finds_pods_by_their_recorded_netns(tmp_path, dp):
    """Records written before the naming change (``<ns>-<name>``) keep their pods."""
    core = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    core.restore()
    ds = core.create_endpoint("deathstar", labels={"class": "deathstar"})
    old = "default-deathstar"
    pod = dp.pods.pop(ds.netns)
    dp.pods[old] = pod.__class__(old, pod.host_ifname, pod.ifindex, pod.ipv4, pod.ipv6)
    ds.netns = old
    core.store.save(ds)
    again = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    report = again.restore()
    assert report["restored"] == 1 and report["removed"] == 0
    assert again.find("deathstar").netns == old and old in dp.pods


def test_restart_restores_endpoints_policies_and_identities(tmp_path, dp):
    core = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    core.restore()
    ds, tf, _ = starwars(core)
    rev = realized(core, core.import_policies([L3L4]))
    snapshot = dict(dp.policy)
    again = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    again.restore()
    assert again.engine.revision == rev
    assert {e.name for e in again.endpoints.values()} == {"deathstar", "tiefighter", "xwing"}
    assert again.find("deathstar").identity == ds.identity
    assert dict(dp.policy) == snapshot


def test_crash_during_create_is_undone_on_restart(tmp_path, dp, monkeypatch):
    core = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    core.restore()
    starwars(core)

    class Killed(BaseException):
        pass

    def killed(*a, **k):
        raise Killed

    # kill -9 right after the pod was plumbed: no rollback runs
    monkeypatch.setattr(core, "regenerate", killed)
    monkeypatch.setattr(core, "_teardown", lambda ep: None)
    with pytest.raises(Killed):
        core.create_endpoint("probe", labels={"app": "probe"})
    monkeypatch.undo()
    assert "default_probe" in dp.pods
    again = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    report = again.restore()
    assert "default_probe" not in dp.pods
    assert report["removed"] == 1
    assert {e.name for e in again.endpoints.values()} == {"deathstar", "tiefighter", "xwing"}
    assert not any(k.ep_id == 4 for k in dp.policy)


def test_pods_of_another_agent_are_left_alone(tmp_path, dp):
    core = AgentCore(AgentSettings(state_dir=str(tmp_path / "a")), dp)
    core.restore()
    dp.ensure_pod("other-agents-pod", ipaddress.IPv4Address("10.244.9.9"), None)
    core.create_endpoint("mine", labels={"app": "mine"})
    again = AgentCore(AgentSettings(state_dir=str(tmp_path / "a")), dp)
    again.restore()
    assert "other-agents-pod" in dp.pods and "default_mine" in dp.pods


def test_a_policy_cidr_naming_a_pod_address_keeps_the_pod_identity(core, dp):
    ds, tf, _ = starwars(core)
    cidr_policy = yaml.safe_load(f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: cidr, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{class: tiefighter}}}}
  egress: [{{toCIDR: ["{ds.ipv4}/32"]}}]
""")
    realized(core, core.import_policies([cidr_policy]))
    net = ipaddress.ip_network(ds.ipv4)
    assert dp.ipcache[net] == ds.identity
    assert any(k.identity == ds.identity for k in entries_for(dp, tf.id) if k.egress)
    realized(core, core.delete_policies(["cidr"]))
    assert dp.ipcache[net] == ds.identity


def test_ipv4_block_matches_a_dual_stack_pod(core, dp):
    ds, tf, _ = starwars(core)
    assert ds.ipv6 is not None
    block = yaml.safe_load("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: block, namespace: default}
spec:
  podSelector: {matchLabels: {class: tiefighter}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 10.244.0.0/16}}]}]
""")
    realized(core, core.import_policies([block]))
    assert any(k.identity == ds.identity for k in entries_for(dp, tf.id) if k.egress)


def test_input_errors_name_the_field(core):
    with pytest.raises(InputError, match="--ipv4"):
        core.create_endpoint("a", ipv4="not-an-ip")
    core.create_endpoint("a", ipv4="10.244.0.50")
    with pytest.raises(InputError, match="already in use"):
        core.create_endpoint("b", ipv4="10.244.0.50")
    with pytest.raises(InputError, match="already exists"):
        core.create_endpoint("a")


def test_online_trace_names_live_endpoints(core):
    from flagella.agent.server import AgentServer

    starwars(core)
    realized(core, core.import_policies([L3L4]))
    server = AgentServer(core)
    trace = server.handlers["policy.trace"]
    answers = trace({"queries": [
        {"src": {"endpoint": "tiefighter"}, "dst": {"endpoint": "deathstar"}, "dport": "80/TCP"},
        {"src": {"endpoint": "default/xwing"}, "dst": {"endpoint": "deathstar"}, "dport": "80/TCP"},
    ]})
    assert [a["verdict"] for a in answers] == ["allowed", "denied"]
    with pytest.raises(InputError, match="not found"):
        trace({"queries": [{"src": {"endpoint": "nope"}, "dst": {"endpoint": "deathstar"}}]})


def test_ct_gc_removes_expired_entries_and_non_tcp_more_often(core, dp):
    from flagella.datapath.port import CTRow

    a, b = ipaddress.ip_address("10.244.0.2"), ipaddress.ip_address("10.244.0.3")
    rows = [
        CTRow(1, True, 6, a, b, 1000, 80, expires_ns=100, packets=1, bytes=60, flags=0),
        CTRow(1, True, 17, a, b, 1000, 53, expires_ns=100, packets=1, bytes=60, flags=0),
        CTRow(1, True, 17, a, b, 1001, 53, expires_ns=10_000, packets=1, bytes=60, flags=0),
    ]
    dp.ct = list(rows)
    dp.clock_ns = 500
    assert core.ct_gc(tcp=False) == 1
    assert [r.proto for r in dp.ct] == [6, 17]
    assert core.ct_gc() == 1
    assert dp.ct == [rows[2]]


def test_create_with_namespace_labels_relabels_the_namespace_members(core):
    first = core.create_endpoint("first", "ns1", {"app": "a"})
    second = core.create_endpoint("second", "ns1", {"app": "a"}, namespace_labels={"team": "blue"})
    assert first.namespace_labels == {"team": "blue"}
    assert first.identity == second.identity
    assert core.namespace_labels["ns1"] == {"team": "blue"}


def test_reserved_label_is_refused_and_nothing_is_created(core):
    with pytest.raises(InputError, match="io.kubernetes.pod.namespace"):
        core.create_endpoint("evil", "lbl", {"app": "admin", "io.kubernetes.pod.namespace": "kube-system"})
    with pytest.raises(InputError, match="--namespace-labels"):
        core.create_endpoint("evil", "lbl", {"app": "admin"}, namespace_labels={"io.cilium.k8s.x": "y"})
    assert not core.endpoints and "lbl" not in core.namespace_labels


def test_online_trace_shows_live_identities(core):
    from flagella.agent.server import AgentServer

    ds, tf, xw = starwars(core)
    answer = AgentServer(core).handlers["policy.trace"](
        {"queries": [{"src": {"endpoint": "xwing"}, "dst": {"endpoint": "deathstar"}}]}
    )[0]
    assert (answer["src_identity"], answer["dst_identity"]) == (xw.identity, ds.identity)


def test_restore_overwrites_labels_an_older_agent_let_a_pod_forge(tmp_path, dp):
    """State written before reserved keys were refused: the forged key is dropped on restart,
    and the forger shares the identity of the pods whose labels it really has."""
    import json

    core = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    core.restore()
    admin = core.create_endpoint("admin", "lbl", {"app": "admin"})
    evil = core.create_endpoint("evil", "lbl", {"app": "admin", "tmp": "x"})
    record = tmp_path / "endpoints" / f"{evil.id}.json"
    obj = json.loads(record.read_text())
    obj["labels"] = {"app": "admin", "io.kubernetes.pod.namespace": "kube-system"}
    record.write_text(json.dumps(obj))

    again = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    again.restore()
    restored = again.find("lbl/evil")
    assert restored.identity == admin.identity
    labels = again.allocator.labels(restored.identity)
    assert labels is not None
    assert [x.value for x in labels if x.key == "io.kubernetes.pod.namespace"] == ["lbl"]
    assert dp.endpoints[restored.ifindex].identity == admin.identity


def test_endpoint_ids_are_never_reused_even_across_restarts(tmp_path, dp):
    core = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    core.restore()
    a = core.create_endpoint("a", labels={"app": "a"})
    b = core.create_endpoint("b", labels={"app": "b"})
    core.delete_endpoint(b.id)
    core.delete_endpoint(a.id)
    c = core.create_endpoint("c", labels={"app": "c"})
    assert c.id > b.id > a.id, (a.id, b.id, c.id)
    core.delete_endpoint(c.id)  # no endpoint left: only the persisted counter remembers
    again = AgentCore(AgentSettings(state_dir=str(tmp_path)), dp)
    again.restore()
    d = again.create_endpoint("d", labels={"app": "d"})
    assert d.id > c.id, (c.id, d.id)


def test_endpoint_delete_forgets_its_fragment_entries(core, dp):
    ds, tf, _ = starwars(core)
    other = ipaddress.ip_address("10.244.9.9")
    dp.frags = [(ds.id, ds.ipv4, other), (tf.id, ds.ipv4, tf.ipv4), (tf.id, other, tf.ipv4)]
    core.delete_endpoint(ds.id)
    # Its own entries, and another endpoint's that name its address, are gone.
    assert dp.frags == [(tf.id, other, tf.ipv4)]


def test_pod_netns_prefix_keeps_names_valid_and_apart(tmp_path):
    from flagella.datapath.port import pod_netns_name

    long_ns, long_name = "n" * 63, "p" * 63
    for prefix in ("", "sys-1234567c-", "x" * 16):
        got = pod_netns_name(long_ns, long_name, prefix)
        assert got.startswith(prefix) and len(got) <= 64
        assert pod_netns_name("default", "web", prefix) == f"{prefix}default_web"
    dp = MemoryDatapath()
    core = AgentCore(AgentSettings(state_dir=str(tmp_path), pod_netns_prefix="c1-"), dp)
    core.restore()
    try:
        assert core.create_endpoint("web").netns == "c1-default_web"
    finally:
        core.close()
    with pytest.raises(InputError, match="pod_netns_prefix"):
        AgentSettings(pod_netns_prefix="-bad").validate()


def test_host_addresses_are_read_again(core: AgentCore, dp: MemoryDatapath) -> None:
    """An address the node gains is reserved:host from the next `host-addresses` run
    (and the node proxy's peer sets hear it); one it loses stops being host."""
    from flagella.identity import RESERVED_IDENTITIES

    host = RESERVED_IDENTITIES["host"]
    heard: list[dict[object, int]] = []
    core.ipcache_listeners.append(lambda desired: heard.append(dict(desired)))
    new = ipaddress.ip_network("198.51.100.7/32")
    assert core.refresh_host_addresses() == 0 and not heard
    assert new not in dp.ipcache
    dp.host.append(ipaddress.ip_address("198.51.100.7"))
    assert core.refresh_host_addresses() == 1
    assert dp.ipcache[new] == host and heard[-1][new] == host
    dp.host.remove(ipaddress.ip_address("198.51.100.7"))
    assert core.refresh_host_addresses() == 1
    assert new not in dp.ipcache and new not in heard[-1]
