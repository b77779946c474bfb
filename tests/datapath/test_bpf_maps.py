"""Map backends and typed wrappers: the in-memory twin behaves as the kernel map.

Every backend test runs twice, on :class:`DictMap` and on a real
:class:`KernelMap` (an unpinned map made for the test; needs root). Pure
helpers (port blocks, masks, event decoding) need neither.
"""

from __future__ import annotations

import ctypes
import ipaddress
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.support.host import require

from flagella.datapath._bpfsys import BPF_EXIST, BPF_NOEXIST, BpfError, MapType
from flagella.datapath.events import EventStruct, EventType, decode_event
from flagella.datapath.maps import (
    MAP_SPECS,
    CtEntry,
    CtFlags,
    CtKey,
    DatapathConfig,
    DatapathMaps,
    DictMap,
    Direction,
    EndpointRow,
    KernelMap,
    MapBackend,
    MapSpec,
    MetricKey,
    MetricValue,
    PolicyEntry,
    PolicyEntryStruct,
    PolicyKey,
    Verdict,
    _key_struct,
    port_range_blocks,
    wild_mask,
)

Factory = Callable[[MapSpec], MapBackend]


@pytest.fixture(params=["dict", "kernel"])
def make(request: pytest.FixtureRequest) -> Iterator[Factory]:
    made: list[MapBackend] = []
    if request.param == "kernel":
        require(bcc=True)

    def factory(spec: MapSpec) -> MapBackend:
        m: MapBackend = KernelMap.create(spec) if request.param == "kernel" else DictMap(spec)
        made.append(m)
        return m

    yield factory
    for m in made:
        m.close()


def small(name: str, n: int = 64) -> MapSpec:
    return MAP_SPECS[name].with_max_entries(n)


@pytest.fixture
def maps(make: Factory) -> DatapathMaps:
    return DatapathMaps._from_backends(
        {
            name: make(spec.with_max_entries(min(spec.max_entries, 1024)))
            for name, spec in MAP_SPECS.items()
            if spec.type != MapType.RINGBUF
        }
    )


def k32(i: int) -> bytes:
    return i.to_bytes(4, sys.byteorder)


# --- raw backend semantics -----------------------------------------------------------------

HASH = MapSpec("t_hash", MapType.HASH, 4, 8, 4)


def test_update_lookup_delete(make: Factory) -> None:
    m = make(HASH)
    assert m.lookup(k32(1)) is None
    m.update(k32(1), b"a" * 8)
    assert m.lookup(k32(1)) == b"a" * 8
    assert sorted(m.keys()) == [k32(1)] and m.items() == [(k32(1), b"a" * 8)]
    assert m.delete(k32(1)) is True and m.delete(k32(1)) is False


def test_update_flags(make: Factory) -> None:
    m = make(HASH)
    with pytest.raises(BpfError) as e:
        m.update(k32(1), b"a" * 8, BPF_EXIST)
    assert e.value.errno == 2  # ENOENT
    m.update(k32(1), b"a" * 8, BPF_NOEXIST)
    with pytest.raises(BpfError) as e:
        m.update(k32(1), b"b" * 8, BPF_NOEXIST)
    assert e.value.errno == 17  # EEXIST
    m.update(k32(1), b"b" * 8, BPF_EXIST)
    assert m.lookup(k32(1)) == b"b" * 8


def test_full_hash_refuses_new_keys(make: Factory) -> None:
    m = make(HASH)
    for i in range(4):
        m.update(k32(i), bytes(8))
    with pytest.raises(BpfError) as e:
        m.update(k32(99), bytes(8))
    assert e.value.errno == 7  # E2BIG
    m.update(k32(0), b"x" * 8)  # existing keys still update


def test_lru_hash_evicts_instead_of_failing(make: Factory) -> None:
    m = make(MapSpec("t_lru", MapType.LRU_HASH, 4, 8, 64))
    for i in range(512):
        m.update(k32(i), bytes(8))
    assert 0 < len(list(m.keys())) <= 64
    assert m.lookup(k32(511)) is not None  # the newest survives


def test_array_has_every_index(make: Factory) -> None:
    m = make(MapSpec("t_array", MapType.ARRAY, 4, 8, 2))
    assert m.lookup(k32(1)) == bytes(8)
    assert m.lookup(k32(2)) is None
    m.update(k32(1), b"z" * 8)
    assert m.lookup(k32(1)) == b"z" * 8
    with pytest.raises(BpfError) as e:
        m.update(k32(2), bytes(8))
    assert e.value.errno == 7  # E2BIG
    with pytest.raises(BpfError) as e:
        m.delete(k32(0))
    assert e.value.errno == 22  # EINVAL


def test_batch_update_and_delete(make: Factory) -> None:
    m = make(MapSpec("t_batch", MapType.HASH, 4, 8, 1000))
    assert m.update_many((k32(i), i.to_bytes(8, "little")) for i in range(500)) == 500
    assert len(m.items()) == 500
    assert m.delete_many(k32(i) for i in range(0, 500, 2)) == 250
    assert sorted(int.from_bytes(k, sys.byteorder) for k in m.keys()) == list(range(1, 500, 2))  # noqa: SIM118


def test_batch_delete_skips_missing_keys(make: Factory) -> None:
    """The kernel's batch delete stops at the first missing key: the rest still go."""
    m = make(MapSpec("t_batchdel", MapType.HASH, 4, 8, 1000))
    m.update_many((k32(i), bytes(8)) for i in range(10))
    gone = [k32(0), k32(100), k32(101), k32(2), k32(0), k32(3), k32(102)]
    assert m.delete_many(gone) == 3
    assert sorted(int.from_bytes(k, sys.byteorder) for k in m.keys()) == [1, *range(4, 10)]  # noqa: SIM118
    assert m.delete_many([k32(100)]) == 0 and m.delete_many([]) == 0


def test_percpu_values_have_a_slot_per_cpu(make: Factory) -> None:
    m = make(small("metrics"))
    slot = 16
    value = b"".join(
        i.to_bytes(8, "little") + (2 * i).to_bytes(8, "little") for i in range(1, m.cpus + 1)
    )
    assert len(value) == slot * m.cpus
    key = bytes([133, 1, 0, 0])
    m.update(key, value)
    assert m.lookup(key) == value


def test_lpm_trie_longest_prefix(make: Factory) -> None:
    from flagella.datapath.maps import IPCache

    cache = IPCache(make(small("ipcache4")), make(small("ipcache6")))
    cache.set("10.0.0.0/8", 1000)
    cache.set("10.1.0.0/16", 1001)
    cache.set("fd00:10:244::/48", 2000)
    cache.set("fd00:10:244::7/128", 2001)
    assert cache.identity_of("10.1.2.3") == 1001
    assert cache.identity_of("10.2.0.1") == 1000
    assert cache.identity_of("11.0.0.1") == 2  # world
    assert cache.identity_of("fd00:10:244::7") == 2001
    assert cache.identity_of("fd00:10:244::8") == 2000
    assert cache.delete("10.1.0.0/16") and not cache.delete("10.1.0.0/16")
    assert cache.identity_of("10.1.2.3") == 1000
    assert set(cache.items()) == {
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00:10:244::/48"),
        ipaddress.ip_network("fd00:10:244::7/128"),
    }
    assert cache.set_many({"192.0.2.0/24": 5, "2001:db8::/32": 6}) == 2
    assert cache.identity_of("192.0.2.9") == 5 and cache.identity_of("2001:db8::1") == 6


# --- typed wrappers ------------------------------------------------------------------------


def test_endpoint_map_round_trip(maps: DatapathMaps) -> None:
    info = EndpointRow(
        12,
        1001,
        True,
        False,
        0b101,
        1 << 16,
        ipaddress.IPv4Address("10.244.0.7"),
        ipaddress.IPv6Address("fd00::7"),
    )
    maps.endpoints.set(42, info)
    maps.endpoints.set(43, EndpointRow(13, 1002))
    assert maps.endpoints.get(42) == info
    assert maps.endpoints.get(43) == EndpointRow(13, 1002)
    assert maps.endpoints.items().keys() == {42, 43}
    assert maps.endpoints.delete(42) and maps.endpoints.get(42) is None


def test_policy_sync_keeps_counters_of_unchanged_entries(maps: DatapathMaps) -> None:
    keep = PolicyKey(5, 1000, False, 6, 80)
    change = PolicyKey(5, 1000, False, 6, 443)
    stale = PolicyKey(5, 0, True, 17, 53)
    other_ep = PolicyKey(6, 0, False, 0, 0, 16)
    for k in (keep, change, stale, other_ep):
        maps.policy.backend.update(
            bytes(_key_struct(k)), bytes(PolicyEntryStruct(verdict=1, packets=5, bytes=500))
        )
    new = PolicyKey(5, 1001, False, 6, 8080, 3)
    written, deleted = maps.policy.sync_endpoint(
        5, {keep: (Verdict.ALLOW, 0), change: (Verdict.REDIRECT, 15001), new: (Verdict.DENY, 0)}
    )
    assert (written, deleted) == (2, 1)
    assert maps.policy.get(keep) == PolicyEntry(Verdict.ALLOW, 0, 5, 500)
    assert maps.policy.get(change) == PolicyEntry(Verdict.REDIRECT, 15001, 0, 0)
    assert maps.policy.get(new) == PolicyEntry(Verdict.DENY)
    assert maps.policy.get(stale) is None
    assert maps.policy.get(other_ep) is not None
    assert maps.policy.delete_endpoint(5) == 3 and len(maps.policy) == 1


def test_policy_key_validation() -> None:
    with pytest.raises(ValueError):
        PolicyKey(1, 0, False, 6, 8081, 1)  # low bit set
    with pytest.raises(ValueError):
        PolicyKey(1, 0, False, 0, 80)  # any protocol needs any port
    with pytest.raises(ValueError):
        PolicyKey(1, 0, False, 6, 0, 17)
    assert PolicyKey.any_port(1, 0, False) == PolicyKey(1, 0, False, 0, 0, 16)


def test_ct_map_entries_and_gc(maps: DatapathMaps) -> None:
    now = time.monotonic_ns()
    live = CtKey(
        5,
        True,
        6,
        ipaddress.IPv4Address("10.244.0.1"),
        ipaddress.IPv4Address("10.244.0.2"),
        40000,
        80,
    )
    dead = CtKey(
        5, False, 17, ipaddress.IPv6Address("fd00::1"), ipaddress.IPv6Address("fd00::2"), 53, 5353
    )
    maps.ct.put(live, CtEntry(now + 10**9, 3, 300, CtFlags.SEEN_NON_SYN))
    maps.ct.put(dead, CtEntry(now - 1, 1, 100, CtFlags(0)))
    assert maps.ct.get(live) == CtEntry(now + 10**9, 3, 300, CtFlags.SEEN_NON_SYN)
    assert set(maps.ct.entries(5)) == {live, dead}
    assert maps.ct.gc(now) == 1
    assert set(maps.ct.items()) == {live}
    assert live.reversed() == CtKey(5, False, 6, live.daddr, live.saddr, 80, 40000)
    # IPv4 is stored IPv4-mapped, ports network order.
    raw = bytes(live._struct())
    assert raw[8:24] == b"\0" * 10 + b"\xff\xff" + bytes([10, 244, 0, 1])
    assert raw[40:44] == bytes([0x9C, 0x40, 0, 80])


def test_metrics_sum_over_cpus(maps: DatapathMaps) -> None:
    backend = maps.metrics.backend
    per_cpu = b"".join(
        (1).to_bytes(8, "little") + (100).to_bytes(8, "little") for _ in range(backend.cpus)
    )
    backend.update(bytes([0, 2, 0, 0]), per_cpu)
    backend.update(bytes([133, 1, 0, 0]), per_cpu)
    assert maps.metrics.get(0, Direction.EGRESS) == MetricValue(backend.cpus, 100 * backend.cpus)
    assert maps.metrics.get(133, Direction.INGRESS).packets == backend.cpus
    assert maps.metrics.get(134, Direction.INGRESS) == MetricValue(0, 0)


def test_forwarded_counts_add_to_the_hash_and_clear_to_zero(maps: DatapathMaps) -> None:
    """The datapath counts forwarded packets in the per-CPU `forwarded` array (by direction);
    an older build's reason-0 entries in the hash add to them."""
    fwd, backend = maps.metrics.forwarded, maps.metrics.backend

    def per_cpu(packets: int, nbytes: int) -> bytes:
        one = packets.to_bytes(8, "little") + nbytes.to_bytes(8, "little")
        return one * fwd.cpus

    assert maps.metrics.read() == {}  # a zeroed array is no count
    fwd.update((2).to_bytes(4, sys.byteorder), per_cpu(3, 300))
    fwd.update((1).to_bytes(4, sys.byteorder), per_cpu(1, 10))
    backend.update(bytes([0, 2, 0, 0]), per_cpu(1, 100))
    backend.update(bytes([133, 2, 0, 0]), per_cpu(1, 60))
    n = fwd.cpus
    assert maps.metrics.read() == {
        MetricKey(0, Direction.EGRESS): MetricValue(4 * n, 400 * n),
        MetricKey(0, Direction.INGRESS): MetricValue(n, 10 * n),
        MetricKey(133, Direction.EGRESS): MetricValue(n, 60 * n),
    }
    maps.metrics.clear()
    assert maps.metrics.read() == {}
    assert len(fwd.items()) == 4  # an array keeps its indexes: zeroed, not deleted


def test_config_defaults_and_update(maps: DatapathMaps) -> None:
    assert maps.config.get() == DatapathConfig()  # zeroed array = Cilium 1.1 lifetimes
    assert DatapathConfig().ct_tcp_ns == 21600 * 10**9
    cfg = DatapathConfig(ct_syn_ns=5 * 10**9, trace_new_flows=True)
    maps.config.set(cfg)
    assert maps.config.get() == cfg
    for flags in ((True, False), (False, True), (True, True)):
        cfg = DatapathConfig(trace_new_flows=flags[0], local_delivery=flags[1])
        maps.config.set(cfg)
        assert maps.config.get() == cfg


def test_clear_empties_everything(maps: DatapathMaps) -> None:
    maps.endpoints.set(1, EndpointRow(1, 1))
    maps.policy.set(PolicyKey.any_port(1, 0, False), Verdict.ALLOW)
    maps.ipcache.set("10.0.0.0/8", 7)
    maps.clear()
    assert not maps.endpoints.items() and not maps.policy.items() and not maps.ipcache.items()


# --- pure helpers --------------------------------------------------------------------------


def test_port_range_blocks_examples() -> None:
    assert port_range_blocks(80, 80) == [(80, 0)]
    assert port_range_blocks(8080, 8083) == [(8080, 2)]
    assert port_range_blocks(0, 65535) == [(0, 16)]
    assert port_range_blocks(1, 65535) == [
        (1, 0),
        (2, 1),
        (4, 2),
        (8, 3),
        (16, 4),
        (32, 5),
        (64, 6),
        (128, 7),
        (256, 8),
        (512, 9),
        (1024, 10),
        (2048, 11),
        (4096, 12),
        (8192, 13),
        (16384, 14),
        (32768, 15),
    ]
    with pytest.raises(ValueError):
        port_range_blocks(10, 9)


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_port_range_blocks_cover_exactly(a: int, b: int) -> None:
    first, last = min(a, b), max(a, b)
    blocks = port_range_blocks(first, last)
    covered = []
    for port, bits in blocks:
        assert port & ((1 << bits) - 1) == 0  # aligned
        covered.append((port, port + (1 << bits) - 1))
    assert covered[0][0] == first and covered[-1][1] == last
    assert all(x[1] + 1 == y[0] for x, y in zip(covered, covered[1:], strict=False))
    assert len(blocks) <= 32  # at most two blocks per size


def test_wild_mask() -> None:
    keys = [
        PolicyKey(1, 0, False, 6, 80),
        PolicyKey(1, 0, False, 6, 8080, 2),
        PolicyKey.any_port(1, 0, False, 17),
        PolicyKey.any_port(1, 0, False),
        PolicyKey(1, 0, True, 6, 443),
    ]
    assert wild_mask(keys, egress=False) == (1 << 0) | (1 << 2) | (1 << 16)
    assert wild_mask(keys, egress=True) == 1


def test_decode_event() -> None:
    s = EventStruct(
        type=1,
        reason=133,
        dir=1,
        family=4,
        proto=6,
        ct_state=1,
        ep_id=9,
        src_identity=1000,
        dst_identity=1001,
        sport=int.from_bytes((40000).to_bytes(2, "big"), sys.byteorder),
        dport=int.from_bytes((80).to_bytes(2, "big"), sys.byteorder),
        len=60,
    )
    s.saddr[10:16] = [0xFF, 0xFF, 10, 244, 0, 1]
    s.daddr[10:16] = [0xFF, 0xFF, 10, 244, 0, 2]
    ev = decode_event(bytes(s) + b"\0\0\0\0")  # ring records are padded to 8 bytes
    assert ev.type == EventType.DROP and ev.reason_text == "Policy denied (L3)"
    assert (str(ev.saddr), str(ev.daddr), ev.sport, ev.dport) == (
        "10.244.0.1",
        "10.244.0.2",
        40000,
        80,
    )
    assert str(ev) == (
        "xx drop (Policy denied (L3)) to endpoint 9, identity 1000->1001: "
        "10.244.0.1:40000 -> 10.244.0.2:80 tcp"
    )
    assert ctypes.sizeof(EventStruct) == 60
