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


# --- reconcile_holders: crash-like reference states converge to exactly the holders -----------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_LABEL_SETS = [parse_labels(f"k8s:app=app{i}") for i in range(6)]


@settings(max_examples=150, deadline=None)
@given(
    holders_per_set=st.lists(st.integers(0, 3), min_size=len(_LABEL_SETS), max_size=len(_LABEL_SETS)),
    skew=st.lists(st.integers(-3, 3), min_size=len(_LABEL_SETS), max_size=len(_LABEL_SETS)),
    garbage=st.lists(st.integers(0, 5), max_size=4),
)
def test_reconcile_holders_converges_to_exactly_the_holders(
    holders_per_set: list[int], skew: list[int], garbage: list[int]
) -> None:
    """Allocate, then corrupt the counts as a crash would (a holder never recorded, a release
    repeated, an identity nobody holds): reconciling leaves exactly one reference per holder."""
    a = Allocator(MemoryBackend())
    holders: list[tuple[int, object]] = []
    idents = {}
    for labels, n in zip(_LABEL_SETS, holders_per_set, strict=True):
        ident = a.allocate(labels)
        idents[ident] = labels
        holders += [(ident, labels)] * n
    # Crash-like damage: counts too high or too low, identities of nobody.
    for (ident, _labels), delta in zip(idents.items(), skew, strict=True):
        for _ in range(max(delta, 0)):
            a.allocate(idents[ident])
        for _ in range(max(-delta, 0)):
            if a.references().get(ident):
                a.release(ident)
    for i in garbage:
        a.allocate(parse_labels(f"k8s:orphan=o{i}"))
    holders.append((1, parse_labels("reserved:host")))  # reserved identities are not counted

    a.reconcile_holders(holders)  # type: ignore[arg-type]

    want = {ident: n for ident, n in zip(idents, holders_per_set, strict=True) if n}
    assert a.references() == want
    for ident in want:
        assert a.labels(ident) == idents[ident]
    # A second reconcile finds nothing to correct.
    assert a.reconcile_holders(holders) == {"corrected": 0, "freed": 0}  # type: ignore[arg-type]


# --- allocate_many: the same as allocating one by one, all or nothing ----------------------


def test_allocate_many_equals_one_by_one(make_backend, tmp_path):
    sets = [parse_labels(t) for t in ("k8s:app=a", "reserved:world", "k8s:app=b", "k8s:app=a", "cidr:10.0.0.0/8")]
    many = Allocator(make_backend())
    one = Allocator(SQLiteBackend(tmp_path / "one-by-one.db"))
    assert many.allocate_many(sets) == [one.allocate(s) for s in sets]
    assert many.references() == one.references()
    assert many.allocate_many([]) == []


class _FailsOnThe(MemoryBackend):
    def __init__(self, nth: int) -> None:
        super().__init__()
        self.left = nth

    def acquire(self, key: str, lowest_free_from: int) -> int:
        self.left -= 1
        if self.left == 0:
            raise RuntimeError(f"store refused {key}")
        return super().acquire(key, lowest_free_from)


def test_allocate_many_failing_midway_releases_what_it_took():
    backend = _FailsOnThe(3)
    alloc = Allocator(backend)
    held = alloc.allocate(parse_labels("k8s:app=held"))  # the first acquire
    with pytest.raises(RuntimeError, match="k8s:app=c"):
        alloc.allocate_many([parse_labels(t) for t in ("k8s:app=held", "k8s:app=c", "k8s:app=d")])
    assert alloc.references() == {held: 1}  # nothing of the failed call stays
    assert alloc.lookup(parse_labels("k8s:app=c")) is None
