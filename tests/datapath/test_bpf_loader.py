"""Loader: compile once per build, reuse pins across restarts, refuse foreign maps, attach.

Each test uses its own pin directory under /sys/fs/bpf/flagella-test-<pid>-*
and removes it, and any namespace it made, even on failure.
"""

from __future__ import annotations

import errno
import itertools
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from conftest_bpf import pin_dir_for_tests, requires_root, run
from tests.support.host import netguard_on

from flagella.datapath import _bpfsys
from flagella.datapath.loader import DatapathSettings, MapSizes, load_datapath, remove_pins
from flagella.datapath.maps import MAP_SPECS, Direction, EndpointRow, MapType
from flagella.errors import DatapathError, InputError

pytestmark = [pytest.mark.root, requires_root]

_seq = itertools.count()
SMALL = MapSizes(
    endpoints=64, policy=256, ipcache=256, ct=256, frag4=64, metrics=64, events_pages=1
)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    d = pin_dir_for_tests(f"-loader-{next(_seq)}")
    remove_pins(d)
    try:
        yield d
    finally:
        remove_pins(d)


def test_second_load_reuses_the_pinned_build_and_state(pin_dir: Path) -> None:
    settings = DatapathSettings(pin_dir=pin_dir, sizes=SMALL)
    with load_datapath(settings) as first:
        assert first.compiled
        first.maps.endpoints.set(9, EndpointRow(1, 1000))
    with load_datapath(settings) as second:
        assert not second.compiled and second.build == first.build
        assert second.maps.endpoints.get(9) == EndpointRow(1, 1000)


def test_changed_source_recompiles_and_keeps_state(pin_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "bpf"
    shutil.copytree(DatapathSettings().source_dir, src)
    old = DatapathSettings(pin_dir=pin_dir, sizes=SMALL, source_dir=src)
    with load_datapath(old) as dp:
        dp.maps.endpoints.set(9, EndpointRow(1, 1000))
        old_build = dp.build
    with (src / "flagella.c").open("a") as f:
        f.write("\n/* a new build */\n")
    new = DatapathSettings(pin_dir=pin_dir, sizes=SMALL, source_dir=src)
    with load_datapath(new) as dp:
        assert dp.compiled and dp.build != old_build
        assert dp.maps.endpoints.get(9) == EndpointRow(1, 1000)
        assert sorted(p.name for p in (pin_dir / "programs").iterdir()) == sorted(
            [old_build, dp.build]
        )
        assert dp.prune_stale_programs() == [old_build]
        assert [p.name for p in (pin_dir / "programs").iterdir()] == [dp.build]


def test_pinned_map_of_another_size_is_refused(pin_dir: Path) -> None:
    with load_datapath(DatapathSettings(pin_dir=pin_dir, sizes=SMALL)):
        pass
    bigger = MapSizes(**{**vars(SMALL), "ct": 512})
    with pytest.raises(DatapathError, match=r"pinned map .*/ct .*max entries 256 \(expected 512\)"):
        load_datapath(DatapathSettings(pin_dir=pin_dir, sizes=bigger))
    # Nothing of the refused build was left behind.
    assert len(list((pin_dir / "programs").iterdir())) == 1


def test_pinned_map_of_another_layout_is_refused(pin_dir: Path) -> None:
    pin_dir.mkdir(parents=True)
    spec = MAP_SPECS["policy"]
    fd = _bpfsys.map_create(MapType.HASH, spec.key_size, 16, 256, 1, "policy")
    try:
        _bpfsys.obj_pin(fd, str(pin_dir / "policy"))
    finally:
        _bpfsys.close(fd)
    with pytest.raises(DatapathError, match="value size 16 \\(expected 24\\)"):
        load_datapath(DatapathSettings(pin_dir=pin_dir, sizes=SMALL))


def test_compile_errors_are_datapath_errors(pin_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "bpf"
    shutil.copytree(DatapathSettings().source_dir, src)
    with (src / "flagella.c").open("a") as f:
        f.write("\nthis is not C;\n")
    with pytest.raises(DatapathError, match="compiling"):
        load_datapath(DatapathSettings(pin_dir=pin_dir, sizes=SMALL, source_dir=src))
    assert not list((pin_dir / "programs").iterdir())


@contextmanager
def _veth(pin_dir: Path, tag: str) -> Iterator[tuple[str, int]]:
    """A namespace of this test with a veth ``lxctest``: (netns, ifindex)."""
    netguard_on()
    ns = f"{pin_dir.name.replace('flagella-test-', 'flt')}-{tag}"
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", "lxctest", "type", "veth", "peer", "name", "peer0", netns=ns)
        yield ns, int(run("cat", "/sys/class/net/lxctest/ifindex", netns=ns).stdout)
    finally:
        run("ip", "netns", "del", ns, check=False)


def _tc_filters(ns: str, hook: str) -> str:
    return run("tc", "filter", "show", "dev", "lxctest", hook, netns=ns).stdout


def test_clsact_attach_is_idempotent_and_detach_cleans_up(pin_dir: Path) -> None:
    with _veth(pin_dir, "tc") as (ns, idx), load_datapath(
        DatapathSettings(pin_dir=pin_dir, sizes=SMALL, attach="tc")
    ) as dp:
        assert dp.attached(idx, netns=ns) == {}
        assert dp.attach(idx, netns=ns) == ["from_pod", "to_pod"]
        assert dp.attach(idx, netns=ns) == []  # a check: nothing to repair
        assert dp.attach_mode == "tc"
        assert dp.attached(idx, netns=ns) == {"from_pod": dp.build, "to_pod": dp.build}
        assert _tc_filters(ns, "ingress").count("flagella_from_pod") == 1
        run("tc", "filter", "del", "dev", "lxctest", "egress", "pref", "1", netns=ns)
        assert dp.attached(idx, netns=ns) == {"from_pod": dp.build}
        assert dp.attach(idx, netns=ns) == ["to_pod"]
        dp.detach(idx, netns=ns)
        assert dp.attached(idx, netns=ns) == {}
        assert "clsact" not in run("tc", "qdisc", "show", "dev", "lxctest", netns=ns).stdout
        dp.detach(idx, netns=ns)  # twice is fine
        run("ip", "link", "del", "lxctest", netns=ns)
        dp.detach(idx, netns=ns)  # and so is a device that is gone


def _link_of(pin: Path) -> _bpfsys.LinkInfo:
    fd = _bpfsys.obj_get(str(pin))
    try:
        return _bpfsys.link_info(fd)
    finally:
        _bpfsys.close(fd)


def test_tcx_links_are_pinned_checked_repaired_and_removed(pin_dir: Path) -> None:
    with _veth(pin_dir, "tcx") as (ns, idx), load_datapath(DatapathSettings(pin_dir=pin_dir, sizes=SMALL)) as dp:
        assert dp.attach(idx, netns=ns) == ["from_pod", "to_pod"]
        assert dp.attach_mode == "tcx"
        assert dp.attach(idx, netns=ns) == []
        assert dp.attached(idx, netns=ns) == {"from_pod": dp.build, "to_pod": dp.build}
        assert "flagella" not in _tc_filters(ns, "ingress") + _tc_filters(ns, "egress")
        pins = {p: pin_dir / "links" / f"{idx}-{p}" for p in ("from_pod", "to_pod")}
        links = {p: _link_of(pin) for p, pin in pins.items()}
        assert {p: (li.ifindex, li.attach_type) for p, li in links.items()} == {
            "from_pod": (idx, _bpfsys.BPF_TCX_INGRESS), "to_pod": (idx, _bpfsys.BPF_TCX_EGRESS)
        }
        # The pin holds the link: nothing of this process does.
        dp.close()
        with load_datapath(DatapathSettings(pin_dir=pin_dir, sizes=SMALL)) as again:
            assert again.attached(idx, netns=ns) == {"from_pod": again.build, "to_pod": again.build}
            # Tampers: the link detached by id (at once), the pin removed (the link goes
            # when the kernel releases its last reference: an RCU callback, then a workqueue).
            run("bpftool", "link", "detach", "id", str(links["from_pod"].id))
            assert again.attached(idx, netns=ns) == {"to_pod": again.build}
            pins["to_pod"].unlink()
            deadline = time.monotonic() + 10
            while again.attached(idx, netns=ns) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert again.attached(idx, netns=ns) == {}
            assert again.attach(idx, netns=ns) == ["from_pod", "to_pod"]
            assert again.attached(idx, netns=ns) == {"from_pod": again.build, "to_pod": again.build}
            again.detach(idx, netns=ns)
            assert again.attached(idx, netns=ns) == {}  # at once: BPF_LINK_DETACH, then unpin
            assert not any((pin_dir / "links").iterdir())
            again.detach(idx, netns=ns)  # twice is fine


def test_a_new_build_is_switched_into_the_same_tcx_link(pin_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "bpf"
    shutil.copytree(DatapathSettings().source_dir, src)
    with _veth(pin_dir, "upg") as (ns, idx):
        with load_datapath(DatapathSettings(pin_dir=pin_dir, sizes=SMALL, source_dir=src)) as old:
            old.attach(idx, netns=ns)
            before = _link_of(pin_dir / "links" / f"{idx}-from_pod")
        with (src / "flagella.c").open("a") as f:
            f.write("\n/* a new build */\n")
        with load_datapath(DatapathSettings(pin_dir=pin_dir, sizes=SMALL, source_dir=src)) as new:
            assert new.build != old.build
            assert new.attach(idx, netns=ns) == ["from_pod", "to_pod"]
            after = _link_of(pin_dir / "links" / f"{idx}-from_pod")
            # BPF_LINK_UPDATE: the same link, another program; never a moment without one.
            assert after.id == before.id and after.prog_id != before.prog_id
            assert new.attached(idx, netns=ns) == {"from_pod": new.build, "to_pod": new.build}


def test_auto_falls_back_to_clsact_where_the_kernel_refuses_tcx(
    pin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel before 6.6 answers BPF_LINK_CREATE with an unknown attach type by EINVAL."""

    def no_tcx(prog_fd: int, ifindex: int, attach_type: int) -> int:
        raise _bpfsys.BpfError("link_create", errno.EINVAL)

    monkeypatch.setattr(_bpfsys, "link_create", no_tcx)
    with _veth(pin_dir, "fb") as (ns, idx):
        with load_datapath(DatapathSettings(pin_dir=pin_dir, sizes=SMALL)) as dp:
            assert dp.attach(idx, netns=ns) == ["from_pod", "to_pod"]
            assert dp.attach_mode == "tc"
            assert _tc_filters(ns, "ingress").count("flagella_from_pod") == 1
            assert dp.attach(idx, netns=ns) == []
            dp.detach(idx, netns=ns)
        forced_tcx = DatapathSettings(pin_dir=pin_dir, sizes=SMALL, attach="tcx")
        with load_datapath(forced_tcx) as forced, pytest.raises(DatapathError, match="link_create"):
            forced.attach(idx, netns=ns)


def test_attach_mode_is_validated() -> None:
    with pytest.raises(InputError, match="attach: must be one of auto, tcx, tc"):
        DatapathSettings(attach="xdp")


def test_a_missing_policy_program_drops_with_missed_tail_call(pin_dir: Path) -> None:
    with load_datapath(DatapathSettings(pin_dir=pin_dir, sizes=SMALL)) as dp:
        dp.maps.endpoints.set(1, EndpointRow(7, 300, ipv4=IPv4Address("10.244.1.1")))
        syn = (
            b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00"
            + bytes.fromhex("450000280001000040060000")
            + bytes([10, 244, 1, 1, 10, 244, 1, 2])
            + bytes.fromhex("03e8005000000001000000005002ffff00000000")
        )
        assert dp.test_run("from_pod", syn).passed
        fd = _bpfsys.obj_get(str(dp.prog_dir / "policy_calls"))
        try:
            assert _bpfsys.map_delete(fd, (2).to_bytes(4, sys.byteorder))  # DIR_EGRESS
        finally:
            _bpfsys.close(fd)
        assert not dp.test_run("from_pod", syn).passed
        assert dp.maps.metrics.get(140, Direction.EGRESS).packets == 1
