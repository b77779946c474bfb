from __future__ import annotations

import pytest

from flagella.identity import MIN_ALLOCATED_ID, Allocator, MemoryBackend, SQLiteBackend
from flagella.policy.labels import parse_labels


@pytest.fixture(params=["memory", "sqlite"])
def make_backend(request, tmp_path):
    def make():
        if request.param == "memory":
            if not hasattr(make, "mem"):
                make.mem = MemoryBackend()
            return make.mem
        return SQLiteBackend(tmp_path / "identities.db")

    return make


def test_same_labels_same_id_in_any_order(make_backend):
    alloc = Allocator(make_backend())
    a = alloc.allocate(parse_labels("k8s:app=web,k8s:io.kubernetes.pod.namespace=x"))
    b = alloc.allocate(parse_labels("k8s:io.kubernetes.pod.namespace=x,k8s:app=web"))
    c = alloc.allocate(parse_labels("k8s:app=db"))
    assert a == b >= MIN_ALLOCATED_ID
    assert c != a
    assert alloc.labels(a) == parse_labels("k8s:app=web,k8s:io.kubernetes.pod.namespace=x")


def test_reserved_labels_get_reserved_ids(make_backend):
    alloc = Allocator(make_backend())
    assert alloc.allocate(parse_labels("reserved:host")) == 1
    assert alloc.allocate(parse_labels("reserved:world")) == 2
    assert alloc.allocate(parse_labels("reserved:init")) == 5


def test_ids_survive_restart(make_backend):
    first = Allocator(make_backend())
    ids = [first.allocate(parse_labels(f"k8s:app=a{i}")) for i in range(5)]
    again = Allocator(make_backend())
    assert [again.lookup(parse_labels(f"k8s:app=a{i}")) for i in range(5)] == ids
    assert again.allocate(parse_labels("k8s:app=a3")) == ids[3]


def test_release_frees_for_reuse_only_after_last_reference(make_backend):
    alloc = Allocator(make_backend())
    web = parse_labels("k8s:app=web")
    ident = alloc.allocate(web)
    alloc.allocate(web)
    assert alloc.release(ident) == 1
    assert alloc.lookup(web) == ident
    assert alloc.release(ident) == 0
    assert alloc.lookup(web) is None
    other = alloc.allocate(parse_labels("k8s:app=other"))
    assert other == ident  # the lowest free id is reused
