"""The etcd identity backend against a real etcd 3.4 on loopback."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagella.identity import (
    MIN_ALLOCATED_ID,
    Allocator,
    EtcdBackend,
    KvstoreUnavailable,
    MemoryBackend,
)
from flagella.identity._etcd_client import prefix_end
from flagella.policy.labels import parse_labels
from tests.support.etcd import EtcdServer


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


Make = Callable[..., EtcdBackend]


@pytest.fixture
def make(etcd: EtcdServer) -> Iterator[Make]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    made: list[EtcdBackend] = []

    def build(node: str, **kw: object) -> EtcdBackend:
        kw.setdefault("timeout_s", 1.0)
        backend = EtcdBackend([etcd.endpoint], node=node, prefix=prefix, **kw)  # type: ignore[arg-type]
        made.append(backend)
        return backend

    build.prefix = prefix  # type: ignore[attr-defined]
    build.etcd = etcd  # type: ignore[attr-defined]
    yield build
    etcd.resume()
    for backend in made:
        backend.close()


def dump(etcd: EtcdServer, prefix: str) -> dict[str, str]:
    body = json.dumps({"key": base64.b64encode(prefix.encode()).decode(), "range_end": prefix_end(prefix)})
    req = urllib.request.Request(etcd.endpoint + "/v3/kv/range", body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        kvs = json.load(r).get("kvs", [])
    return {
        base64.b64decode(kv["key"]).decode()[len(prefix) + 1 :]: base64.b64decode(kv.get("value", "")).decode()
        for kv in kvs
    }


def dump_of(make: Make) -> dict[str, str]:
    return dump(make.etcd, make.prefix)  # type: ignore[attr-defined]


def check_consistent(state: dict[str, str]) -> dict[str, int]:
    """id/N <-> label/K is a bijection; every ref points at its label's id. Returns {K: N}."""
    ids = {int(k[3:]): v for k, v in state.items() if k.startswith("id/")}
    labels = {k[6:]: int(v) for k, v in state.items() if k.startswith("label/")}
    assert {v: k for k, v in ids.items()} == labels
    for k, v in state.items():
        if k.startswith("ref/"):
            assert int(v) in ids, k
    return labels


def wait_for(cond: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


WEB = parse_labels("k8s:app=web,k8s:io.kubernetes.pod.namespace=prod")
DB = parse_labels("k8s:app=db")


def test_allocate_lookup_release_across_nodes(make: Make, etcd: EtcdServer) -> None:
    a, b = Allocator(make("node-a")), Allocator(make("node-b"))
    web = a.allocate(WEB)
    assert web >= MIN_ALLOCATED_ID
    assert b.lookup(WEB) == web  # read from etcd, not b's cache
    assert b.labels(web) == WEB
    assert b.allocate(WEB) == web
    db = b.allocate(DB)
    assert db != web
    assert a.labels(db) == DB
    assert a.release(web) == 0
    assert check_consistent(dump(etcd, make.prefix))[  # type: ignore[attr-defined]
        "k8s:app=web;k8s:io.kubernetes.pod.namespace=prod"
    ] == web  # b still holds it
    assert b.release(web) == 0
    state = dump(etcd, make.prefix)  # type: ignore[attr-defined]
    assert check_consistent(state) == {"k8s:app=db": db}
    assert Allocator(make("node-c")).lookup(WEB) is None


def test_local_reference_counts(make: Make, etcd: EtcdServer) -> None:
    backend = make("node-a")
    alloc = Allocator(backend)
    web = alloc.allocate(WEB)
    assert alloc.allocate(WEB) == web
    assert backend.references() == {web: 2}
    assert alloc.release(web) == 1
    assert web in check_consistent(dump(etcd, make.prefix)).values()  # type: ignore[attr-defined]
    assert alloc.release(web) == 0
    assert alloc.release(web) == 0  # a repeated release is harmless
    assert dump(etcd, make.prefix) == {}  # type: ignore[attr-defined]


def test_freed_ids_are_reused_lowest_first_after_a_bulk_allocation(make: Make) -> None:
    """The candidate scan resumes where it stopped (no rescan per id), yet ids freed below
    that point are taken again first, as the SQLite store and the twin do."""
    backend = make("node-a")
    first = [f"k8s:app=bulk{i}" for i in range(70)]
    assert backend.acquire_many(first) == list(range(MIN_ALLOCATED_ID, MIN_ALLOCATED_ID + 70))
    holes = [MIN_ALLOCATED_ID + 3, MIN_ALLOCATED_ID + 40, MIN_ALLOCATED_ID + 41]
    for ident in holes:
        assert backend.release(ident) == 0
    more = [f"k8s:app=more{i}" for i in range(5)]
    assert backend.acquire_many(more) == [*holes, MIN_ALLOCATED_ID + 70, MIN_ALLOCATED_ID + 71]
    assert backend.acquire("k8s:app=one", MIN_ALLOCATED_ID) == MIN_ALLOCATED_ID + 72
    # Another node takes the next id behind this node's back: the txn naming it loses,
    # and the retry (spread out into a region, see `_candidate`) gets a free id.
    other = make("node-b")
    assert other.acquire_many(["k8s:app=elsewhere"]) == [MIN_ALLOCATED_ID + 73]
    got = backend.acquire("k8s:app=after", MIN_ALLOCATED_ID)
    assert got not in range(MIN_ALLOCATED_ID, MIN_ALLOCATED_ID + 74)
    assert check_consistent(dump_of(make))["k8s:app=after"] == got


@pytest.mark.parametrize("mode", ["one-by-one", "batched"])
def test_four_agents_race_without_duplicates(make: Make, etcd: EtcdServer, mode: str) -> None:
    agents = [make(f"node-{i}") for i in range(4)]
    shared = [f"k8s:app=shared{i}" for i in range(60)]
    results: dict[int, dict[str, int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run(i: int) -> None:
        own = [f"k8s:app=own{i}-{j}" for j in range(40)]
        keys = shared[i * 7 :] + own + shared[: i * 7]  # different orders
        start.wait()
        try:
            if mode == "batched":
                ids = agents[i].acquire_many(keys)
            else:
                ids = [agents[i].acquire(key, MIN_ALLOCATED_ID) for key in keys]
            results[i] = dict(zip(keys, ids, strict=True))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for key in shared:
        assert len({results[i][key] for i in range(4)}) == 1, key
    every = {k: v for r in results.values() for k, v in r.items()}
    assert len(every) == 60 + 4 * 40
    assert len(set(every.values())) == len(every)  # no id for two label sets
    state = dump(etcd, make.prefix)  # type: ignore[attr-defined]
    assert check_consistent(state) == every
    assert sum(1 for k in state if k.startswith("ref/")) == 4 * 60 + 4 * 40


def test_dead_agents_references_expire_with_its_lease(make: Make, etcd: EtcdServer) -> None:
    alive, doomed = make("node-alive"), make("node-doomed", lease_ttl_s=2)
    both = alive.acquire("k8s:app=both", MIN_ALLOCATED_ID)
    assert doomed.acquire("k8s:app=both", MIN_ALLOCATED_ID) == both
    only = doomed.acquire("k8s:app=only-doomed", MIN_ALLOCATED_ID)
    doomed.close(revoke=False)  # dies: no more keepalives, the lease runs out

    def collected() -> bool:
        alive.gc()
        return "k8s:app=only-doomed" not in check_consistent(dump(etcd, make.prefix))  # type: ignore[attr-defined]

    assert wait_for(collected)
    labels = check_consistent(dump(etcd, make.prefix))  # type: ignore[attr-defined]
    assert labels == {"k8s:app=both": both}
    assert alive.lookup("k8s:app=only-doomed") is None
    assert only not in labels.values()


def test_outage_keeps_cache_fails_new_allocations_and_catches_up(make: Make, etcd: EtcdServer) -> None:
    backend = make("node-a", lease_ttl_s=3)
    alloc = Allocator(backend)
    web, db = alloc.allocate(WEB), alloc.allocate(DB)
    etcd.pause()  # SIGSTOP: connections hang, requests time out
    try:
        assert alloc.lookup(WEB) == web
        assert alloc.labels(db) == DB
        assert alloc.allocate(WEB) == web  # another reference to a held identity
        with pytest.raises(KvstoreUnavailable, match="cannot allocate an identity"):
            alloc.allocate(parse_labels("k8s:app=new"))
        assert not backend.online
        with pytest.raises(KvstoreUnavailable):
            alloc.allocate(parse_labels("k8s:app=new"))
        assert alloc.release(db) == 0  # remembered, done on reconnection
        assert alloc.lookup(parse_labels("k8s:app=never-seen")) is None
    finally:
        etcd.resume()
    assert backend.wait_online()
    new = alloc.allocate(parse_labels("k8s:app=new"))
    labels = check_consistent(dump(etcd, make.prefix))  # type: ignore[attr-defined]
    assert labels == {"k8s:app=web;k8s:io.kubernetes.pod.namespace=prod": web, "k8s:app=new": new}
    assert backend.references() == {web: 2, new: 1}


def test_bulk_allocation_during_an_outage_leaves_nothing_behind(make: Make, etcd: EtcdServer) -> None:
    """`Allocator.allocate_many` (the agent's CIDR identities) is all or nothing: with etcd
    gone, the references it took to held identities are given back with the error."""
    backend = make("node-a", lease_ttl_s=3)
    alloc = Allocator(backend)
    web = alloc.allocate(WEB)
    db = Allocator(make("node-b")).allocate(DB)
    assert alloc.lookup(DB) == db  # known here, held only by node-b: a reference needs etcd
    many = [WEB, parse_labels("k8s:app=new1"), DB, parse_labels("reserved:world"), WEB]
    etcd.pause()
    try:
        with pytest.raises(KvstoreUnavailable):
            alloc.allocate_many(many)  # fails creating new1
        with pytest.raises(KvstoreUnavailable):
            alloc.allocate_many([WEB, DB, WEB])  # the two WEB references are taken, DB's fails
        assert backend.references() == {web: 1}
    finally:
        etcd.resume()
    assert backend.wait_online()
    ids = alloc.allocate_many(many)
    assert ids[0] == ids[4] == web and ids[2] == db and ids[3] == 2 and len(set(ids)) == 4
    assert backend.references() == {web: 3, ids[1]: 1, db: 1}
    assert set(check_consistent(dump(etcd, make.prefix)).values()) == {web, ids[1], db}  # type: ignore[attr-defined]


def test_etcd_restart_and_lost_lease_are_caught_up(make: Make, etcd: EtcdServer) -> None:
    a, b = make("node-a", lease_ttl_s=2), make("node-b")
    web = a.acquire("k8s:app=web", MIN_ALLOCATED_ID)
    etcd.kill()
    try:
        with pytest.raises(KvstoreUnavailable):
            a.acquire("k8s:app=other", MIN_ALLOCATED_ID)
        assert a.lookup("k8s:app=web") == web
    finally:
        etcd.start()
    assert a.wait_online()
    # a's lease is revoked behind its back (as if it had expired); b collects the id
    req = urllib.request.Request(
        etcd.endpoint + "/v3/kv/lease/revoke", json.dumps({"ID": str(a.lease)}).encode(), method="POST"
    )
    urllib.request.urlopen(req, timeout=5).close()
    assert wait_for(lambda: b.gc() == 1 or "k8s:app=web" not in check_consistent(dump(etcd, make.prefix)))  # type: ignore[attr-defined]
    assert b.lookup("k8s:app=web") is None
    # a notices at its next keepalive, takes a new lease and re-writes its reference
    assert wait_for(lambda: check_consistent(dump(etcd, make.prefix)).get("k8s:app=web") == web)  # type: ignore[attr-defined]
    assert b.acquire("k8s:app=web", MIN_ALLOCATED_ID) == web
    assert a.references() == {web: 1}


AGENT = """
import sys, time
from flagella.identity import EtcdBackend
b = EtcdBackend([sys.argv[1]], node="killed", prefix=sys.argv[2], lease_ttl_s=2)
print(b.acquire("k8s:app=killed", 256), flush=True)
time.sleep(600)
"""


def test_sigkilled_agent_process_frees_its_identities(make: Make, etcd: EtcdServer) -> None:
    survivor = make("node-survivor")
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT, etcd.endpoint, make.prefix],  # type: ignore[attr-defined]
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None
        ident = int(proc.stdout.readline())
        assert survivor.lookup("k8s:app=killed") == ident
    finally:
        proc.kill()
        proc.wait(10)
    assert wait_for(lambda: survivor.gc() == 1)
    assert check_consistent(dump(etcd, make.prefix)) == {}  # type: ignore[attr-defined]


OPS = st.lists(
    st.tuples(st.sampled_from(["acquire", "release", "lookup"]), st.integers(0, 5)), max_size=25
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_twin_and_etcd_agree(etcd: EtcdServer, ops: list[tuple[str, int]]) -> None:
    twin = MemoryBackend()
    real = EtcdBackend([etcd.endpoint], node="n", prefix=f"twin-{uuid.uuid4().hex[:12]}")
    try:
        for op, n in ops:
            key = f"k8s:app=a{n}"
            if op == "acquire":
                assert real.acquire(key, MIN_ALLOCATED_ID) == twin.acquire(key, MIN_ALLOCATED_ID)
            elif op == "release":
                ident = twin.lookup(key)
                if ident is not None:
                    assert real.release(ident) == twin.release(ident)
            else:
                assert real.lookup(key) == twin.lookup(key)
        assert list(real.items()) == list(twin.items())
        labels = check_consistent(dump(etcd, real.prefix))
        assert labels == {key: ident for ident, key, _refs in twin.items()}
    finally:
        real.close()
