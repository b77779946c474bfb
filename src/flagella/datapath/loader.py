"""Compile, pin and attach the node's datapath program; reuse it across restarts.

Theory of operation
-------------------
There is one BPF object per node (per network namespace: endpoints are keyed
by ifindex). Its state lives in maps pinned under ``pin_dir`` (default
``/sys/fs/bpf/flagella``); bcc's ``BPF_TABLE_PINNED`` opens them when they
exist and creates them otherwise, so an agent restart or an upgrade keeps
endpoints, policy, ipcache and conntrack. Before compiling, every existing pin
is checked against :data:`~flagella.datapath.maps.MAP_SPECS` (type, key and
value size, size, flags); a mismatch is a :class:`DatapathError`, never a
silent reuse of a map of another layout.

A build is identified by the SHA-256 of the C sources, the compile flags
(pin directory, map sizes) and the kernel release. Its four programs and its
prog array are pinned under ``pin_dir/programs/<hash>/``. :func:`load_datapath`
opens those pins when they exist (no bcc import, no compile: milliseconds)
and compiles only otherwise (about a second).

:meth:`LoadedBuild.attach` runs ``from_pod`` on the ingress and ``to_pod`` on the
egress of a pod's host veth. Where the kernel has tcx (6.6+) each is a BPF
link (BPF_LINK_CREATE, BPF_TCX_INGRESS/EGRESS) pinned at
``pin_dir/links/<ifindex>-<program>``: the pin, not the agent, keeps it
attached, so a restart or a crash leaves traffic enforced, and a new build is
switched in with BPF_LINK_UPDATE (atomically). Otherwise (``attach: tc``, or
``auto`` on a kernel whose BPF_LINK_CREATE refuses tcx) each is a clsact
filter with a fixed priority and handle, so that attaching a new build
replaces the old filter atomically; the filter's name carries the build hash.
``attach`` is a check-and-repair that returns what it had to (re)attach, which
is how the agent's sync controller notices a filter deleted with ``tc`` or a
link removed with ``bpftool`` (`attached` reports what runs: the kernel's
``BPF_PROG_QUERY`` for tcx, the filter dump for clsact). :meth:`LoadedBuild.detach`
removes both kinds. :meth:`LoadedBuild.prune_stale_programs`
removes the pins of other builds, and must only run once every device runs
the current one: an old ``from_pod`` still attached tail-calls into its own
build's prog array, which the kernel empties when its pin goes.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from flagella.datapath import _bpfsys
from flagella.datapath._bpfsys import MapType
from flagella.datapath._netlink import run_in_netns
from flagella.datapath.events import EventReader
from flagella.datapath.maps import MAP_SPECS, DatapathMaps, KernelMap, MapSpec
from flagella.errors import DatapathError, InputError

__all__ = [
    "PROGRAMS",
    "LoadedBuild",
    "DatapathSettings",
    "MapSizes",
    "TestRunResult",
    "load_datapath",
    "remove_pins",
    "source_hash",
]

PROGRAMS = ("from_pod", "to_pod", "policy_from_pod", "policy_to_pod")
"""The programs of a build; the last two are reached by tail call through ``policy_calls``."""

_PROG_ARRAY = "policy_calls"
_DIR_INGRESS = 1  # prog array index = the C DIR_* value
_DIR_EGRESS = 2
_TC_INGRESS = 0xFFFFFFF2  # clsact ingress: from the pod
_TC_EGRESS = 0xFFFFFFF3  # clsact egress: to the pod
_FILTER_PRIO = 1
_FILTER_HANDLE = 1
_HOOK_PROGRAMS = ("from_pod", "to_pod")
_TCX_HOOKS = {"from_pod": _bpfsys.BPF_TCX_INGRESS, "to_pod": _bpfsys.BPF_TCX_EGRESS}
#: What BPF_LINK_CREATE answers on a kernel without tcx (unknown attach type).
_NO_TCX_ERRNOS = (errno.EINVAL, errno.EOPNOTSUPP, 524)  # 524: ENOTSUPP (kernel-internal)
ATTACH_MODES = ("auto", "tcx", "tc")

_log = structlog.get_logger("flagella.datapath.loader")

_T = TypeVar("_T")


def _default_source_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "bpf"


@dataclass(frozen=True)
class MapSizes:
    """max_entries of the sized maps (compiled into the program, checked on reuse)."""

    endpoints: int = 65536
    policy: int = 262144
    ipcache: int = 512000  # each of ipcache4 and ipcache6
    ct: int = 262144
    frag4: int = 8192  # each of frag4 and frag6
    metrics: int = 1024
    events_pages: int = 64  # ring buffer size in 4 KiB pages, a power of two

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"sizes.{name}: must be positive")
        if self.events_pages & (self.events_pages - 1):
            raise ValueError("sizes.events_pages: must be a power of two")


@dataclass(frozen=True)
class DatapathSettings:
    """Where the datapath lives and how big its maps are."""

    pin_dir: Path = Path("/sys/fs/bpf/flagella")
    source_dir: Path = field(default_factory=_default_source_dir)
    sizes: MapSizes = field(default_factory=MapSizes)
    #: ``auto``: tcx links, or clsact where BPF_LINK_CREATE refuses tcx; ``tcx`` or ``tc``
    #: (clsact) force one.
    attach: str = "auto"

    def __post_init__(self) -> None:
        if self.attach not in ATTACH_MODES:
            raise InputError(f"attach: must be one of {', '.join(ATTACH_MODES)}, got {self.attach!r}")

    def specs(self) -> dict[str, MapSpec]:
        """:data:`MAP_SPECS` with this configuration's sizes."""
        s = self.sizes
        sized = {
            "endpoints": s.endpoints,
            "policy": s.policy,
            "ipcache4": s.ipcache,
            "ipcache6": s.ipcache,
            "ct": s.ct,
            "frag4": s.frag4,
            "frag6": s.frag4,
            "metrics": s.metrics,
            "events": s.events_pages * 4096,
        }
        return {
            n: spec.with_max_entries(sized.get(n, spec.max_entries))
            for n, spec in MAP_SPECS.items()
        }

    def cflags(self) -> list[str]:
        s = self.sizes
        return [
            f'-DPIN_DIR="{self.pin_dir}"',
            f"-DENDPOINTS_MAX={s.endpoints}",
            f"-DPOLICY_MAX={s.policy}",
            f"-DIPCACHE_MAX={s.ipcache}",
            f"-DCT_MAX={s.ct}",
            f"-DFRAG4_MAX={s.frag4}",
            f"-DFRAG6_MAX={s.frag4}",
            f"-DMETRICS_MAX={s.metrics}",
            f"-DEVENTS_PAGES={s.events_pages}",
        ]


def source_hash(settings: DatapathSettings) -> str:
    """Identity of a build: sources, flags and the kernel it is compiled against."""
    h = hashlib.sha256()
    files = sorted(p for p in settings.source_dir.iterdir() if p.suffix in (".c", ".h"))
    if not any(p.name == "flagella.c" for p in files):
        raise DatapathError(f"{settings.source_dir}: no flagella.c")
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update("\0".join(settings.cflags()).encode())
    h.update(os.uname().release.encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TestRunResult:
    verdict: int  # TC_ACT_OK (0) or TC_ACT_SHOT (2)
    mark: int  # skb->mark after the program

    __test__ = False  # not a pytest class

    @property
    def passed(self) -> bool:
        return self.verdict == 0


class LoadedBuild:
    """A loaded build: its programs (as fds), the pinned state maps, attach/detach."""

    def __init__(
        self,
        settings: DatapathSettings,
        build: str,
        prog_fds: Mapping[str, int],
        maps: DatapathMaps,
        compiled: bool,
        load_seconds: float,
    ) -> None:
        self.settings = settings
        self.build = build
        self.prog_fds = dict(prog_fds)
        self.maps = maps
        self.compiled = compiled  # False when a pinned build was reused
        self.load_seconds = load_seconds
        self._mode: str | None = None  # "tcx" or "tc" once an attach has decided (auto)
        self._ids: dict[str, int] = {}  # program ids of this build, for prog_query

    @property
    def prog_dir(self) -> Path:
        return _prog_dir(self.settings, self.build)

    def _filter_name(self, prog: str) -> str:
        return f"flagella_{prog}:{self.build}"

    @property
    def attach_mode(self) -> str:
        """``tcx`` or ``tc`` (clsact): what `attach` uses, once it has decided."""
        return self._mode or ("tc" if self.settings.attach == "tc" else "tcx")

    def attach(self, ifindex: int, netns: str | None = None) -> list[str]:
        """Make ``from_pod``/``to_pod`` of this build run on host veth ``ifindex``.

        A check-and-repair: it reads what is attached and (re)attaches only what is missing
        or runs another program, so calling it on a healthy device changes nothing. Returns
        the programs it (re)attached. With tcx, an existing pinned link of another build is
        switched to this build in place (BPF_LINK_UPDATE: no packet goes unchecked).
        """
        if self.attach_mode == "tcx":
            try:
                changed = self._in(netns, lambda: self._attach_tcx(ifindex))
            except DatapathError as e:
                if self.settings.attach == "tcx" or self._mode == "tcx" or \
                        getattr(e, "errno", None) not in _NO_TCX_ERRNOS:
                    raise
                self._mode = "tc"  # a kernel without tcx (before 6.6): clsact from now on
                _log.warning("tcx_unavailable", error=str(e), fallback="clsact")
            else:
                self._mode = "tcx"
                if changed:
                    self._detach_tc(ifindex, netns)  # a clsact filter of an older agent
                return changed
        current = self._attached_tc(ifindex, netns)
        missing = [p for p in _HOOK_PROGRAMS if current.get(p) != self.build]
        if missing:
            self._attach_tc(ifindex, netns)
        return missing

    def _prog_ids(self) -> dict[str, int]:
        if not self._ids:
            self._ids = {p: _bpfsys.prog_info(self.prog_fds[p]).id for p in _HOOK_PROGRAMS}
        return self._ids

    def _link_pin(self, ifindex: int, prog: str) -> Path:
        return self.settings.pin_dir / "links" / f"{ifindex}-{prog}"

    def _attach_tcx(self, ifindex: int) -> list[str]:
        changed = []
        ids = self._prog_ids()
        for prog, attach_type in _TCX_HOOKS.items():
            running = _bpfsys.prog_query(ifindex, attach_type)
            pin = self._link_pin(ifindex, prog)
            link = _open_link(pin)
            try:
                if link is not None:
                    fd, info = link
                    live = info.ifindex == ifindex and info.prog_id in running
                    if live and info.prog_id == ids[prog]:
                        continue
                    if live:  # another build: swap the program under the packet flow
                        _bpfsys.link_update(fd, self.prog_fds[prog])
                        changed.append(prog)
                        continue
                    pin.unlink(missing_ok=True)  # detached or its device gone: a dead link
            finally:
                if link is not None:
                    os.close(link[0])
            fd = _bpfsys.link_create(self.prog_fds[prog], ifindex, attach_type)
            try:
                pin.parent.mkdir(parents=True, exist_ok=True)
                _bpfsys.obj_pin(fd, str(pin))
            finally:
                os.close(fd)  # the pin holds the link from now on
            changed.append(prog)
        return changed

    def _attach_tc(self, ifindex: int, netns: str | None) -> None:
        with _netlink(netns) as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except Exception as e:  # pyroute2 NetlinkError
                if getattr(e, "code", None) != errno.EEXIST:
                    raise DatapathError(f"clsact on ifindex {ifindex}: {e}") from e
            for parent, prog in ((_TC_INGRESS, "from_pod"), (_TC_EGRESS, "to_pod")):
                try:
                    ipr.tc(
                        "replace-filter",
                        "bpf",
                        ifindex,
                        _FILTER_HANDLE,
                        fd=self.prog_fds[prog],
                        name=self._filter_name(prog),
                        parent=parent,
                        classid=1,
                        direct_action=True,
                        prio=_FILTER_PRIO,
                    )
                except Exception as e:
                    raise DatapathError(f"attach {prog} on ifindex {ifindex}: {e}") from e

    def detach(self, ifindex: int, netns: str | None = None) -> None:
        """Remove our tcx links (their pins) and clsact filters, and the clsact qdisc if
        nothing else uses it. A device that is already gone is not an error."""
        for prog in _HOOK_PROGRAMS:
            pin = self._link_pin(ifindex, prog)
            link = _open_link(pin)
            if link is not None:
                try:
                    # Now, not when the pin's release gets round to it.
                    _bpfsys.link_detach(link[0])
                except DatapathError as e:
                    if getattr(e, "errno", None) not in (errno.ENOLINK, errno.EINVAL, errno.ENODEV):
                        raise
                finally:
                    os.close(link[0])
            pin.unlink(missing_ok=True)
        self._detach_tc(ifindex, netns)

    def _detach_tc(self, ifindex: int, netns: str | None) -> None:
        with _netlink(netns) as ipr:
            for parent in (_TC_INGRESS, _TC_EGRESS):
                try:
                    ipr.tc(
                        "del-filter",
                        "bpf",
                        ifindex,
                        _FILTER_HANDLE,
                        parent=parent,
                        prio=_FILTER_PRIO,
                    )
                except Exception as e:
                    if getattr(e, "code", None) not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                        raise DatapathError(f"detach from ifindex {ifindex}: {e}") from e
            try:
                others = [
                    f
                    for parent in (_TC_INGRESS, _TC_EGRESS)
                    for f in ipr.get_filters(ifindex, parent=parent)
                    if f["handle"]
                ]
                if not others:
                    ipr.tc("del", "clsact", ifindex)
            except Exception as e:
                if getattr(e, "code", None) not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise DatapathError(f"clsact removal on ifindex {ifindex}: {e}") from e

    def attached(self, ifindex: int, netns: str | None = None) -> dict[str, str]:
        """Our programs running on ``ifindex``: {"from_pod"|"to_pod": build hash}, by tcx
        link (this build's) or clsact filter (any build's, named in the filter)."""
        out = self._attached_tc(ifindex, netns)
        if self.attach_mode == "tcx":
            ids = self._prog_ids()

            def query() -> dict[str, str]:
                found = {}
                for prog, attach_type in _TCX_HOOKS.items():
                    try:
                        running = _bpfsys.prog_query(ifindex, attach_type)
                    except DatapathError as e:
                        if getattr(e, "errno", None) in (errno.ENODEV, *_NO_TCX_ERRNOS):
                            continue
                        raise
                    if ids[prog] in running:
                        found[prog] = self.build
                return found

            out.update(self._in(netns, query))
        return out

    def _attached_tc(self, ifindex: int, netns: str | None) -> dict[str, str]:
        out = {}
        with _netlink(netns) as ipr:
            for parent, prog in ((_TC_INGRESS, "from_pod"), (_TC_EGRESS, "to_pod")):
                try:
                    filters = ipr.get_filters(ifindex, parent=parent)
                except Exception as e:
                    if getattr(e, "code", None) in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                        continue
                    raise DatapathError(f"filters of ifindex {ifindex}: {e}") from e
                for f in filters:
                    opts = f.get_attr("TCA_OPTIONS")
                    name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
                    if name and name.startswith(f"flagella_{prog}:"):
                        out[prog] = name.split(":", 1)[1]
        return out

    @staticmethod
    def _in(netns: str | None, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` in ``netns`` (bpf(2) resolves an ifindex in the calling thread's)."""
        return fn() if netns is None else run_in_netns(netns, fn)

    def events(self) -> EventReader:
        """A reader of the drop/trace ring buffer (close it when done)."""
        return EventReader.open_pinned(self.settings.pin_dir)

    def test_run(
        self, program: str, packet: bytes, ifindex: int = 1, mark: int = 0
    ) -> TestRunResult:
        """Run ``program`` once on an Ethernet frame (BPF_PROG_TEST_RUN).

        The kernel resolves ``ifindex`` in the caller's network namespace and uses loopback
        (1) for 0 or 1, so endpoint entries under ifindex 1 let tests and diagnostics drive
        the program without a device.
        """
        # struct __sk_buff up to ifindex: len, pkt_type, mark (8), queue_mapping, protocol,
        # vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex, ifindex (40).
        ctx = bytearray(44)
        ctx[8:12] = mark.to_bytes(4, sys.byteorder)
        ctx[40:44] = ifindex.to_bytes(4, sys.byteorder)
        retval, _, ctx_out = _bpfsys.prog_test_run(self.prog_fds[program], packet, bytes(ctx))
        return TestRunResult(retval, int.from_bytes(ctx_out[8:12], sys.byteorder))

    def prune_stale_programs(self) -> list[str]:
        """Unpin every other build; returns their hashes. Call only once all devices run this
        build (see the module docstring)."""
        root = self.settings.pin_dir / "programs"
        pruned = []
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if d.name != self.build:
                shutil.rmtree(d, ignore_errors=True)
                pruned.append(d.name)
        return pruned

    def close(self) -> None:
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds.clear()
        self.maps.close()

    def __enter__(self) -> LoadedBuild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prog_dir(settings: DatapathSettings, build: str) -> Path:
    return settings.pin_dir / "programs" / build


@contextmanager
def _netlink(netns: str | None) -> Iterator[Any]:
    from pyroute2 import IPRoute

    try:
        ipr = IPRoute(netns=netns) if netns else IPRoute()
    except Exception as e:
        raise DatapathError(f"netlink socket (netns {netns or 'host'}): {e}") from e
    try:
        yield ipr
    finally:
        ipr.close()


def _open_build(prog_dir: Path) -> dict[str, int] | None:
    """The fds of a pinned build, or None if it is incomplete or absent."""
    if not all((prog_dir / n).exists() for n in (*PROGRAMS, _PROG_ARRAY)):
        return None
    fds: dict[str, int] = {}
    try:
        for name in PROGRAMS:
            fds[name] = _bpfsys.obj_get(str(prog_dir / name))
    except DatapathError:
        for fd in fds.values():
            os.close(fd)
        return None
    return fds


def _open_link(pin: Path) -> tuple[int, _bpfsys.LinkInfo] | None:
    """The fd and info of the link pinned at ``pin``, or None when there is none."""
    if not pin.exists():
        return None
    try:
        fd = _bpfsys.obj_get(str(pin))
    except DatapathError:
        pin.unlink(missing_ok=True)  # not a link (or unreadable): it is replaced
        return None
    try:
        return fd, _bpfsys.link_info(fd)
    except BaseException:
        os.close(fd)
        raise


def _check_pinned_maps(settings: DatapathSettings) -> None:
    for name, spec in settings.specs().items():
        path = settings.pin_dir / name
        if path.exists():
            KernelMap.open_pinned(path, spec).close()


@contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """bcc and clang write diagnostics to fd 2; keep them for the error message instead."""
    out: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _with_diagnostics(what: str, call: Callable[[], _T], lines: int = 40) -> _T:
    """Run a bcc call with clang's and the verifier's output captured; on failure raise a
    DatapathError that carries the end of it."""
    with _captured_stderr() as diag:
        try:
            return call()
        except Exception as e:
            failure = e
    raise DatapathError(f"{what}: {failure}\n{_tail(diag, lines)}") from failure


def _compile(settings: DatapathSettings, prog_dir: Path) -> None:
    try:
        from bcc import BPF
    except ImportError as e:
        raise DatapathError(f"bcc is not importable (python3-bpfcc): {e}") from e

    cflags = [
        *settings.cflags(),
        f'-DPROG_DIR="{prog_dir}"',
        f"-I{settings.source_dir}",
        "-Wno-unused-function",
        "-Wno-macro-redefined",
    ]
    src = settings.source_dir / "flagella.c"
    b = _with_diagnostics(
        f"compiling {src}", lambda: BPF(src_file=str(src).encode(), cflags=cflags)
    )
    try:
        fns = _with_diagnostics(
            f"loading {src}",
            lambda: {name: b.load_func(name.encode(), BPF.SCHED_CLS) for name in PROGRAMS},
            lines=60,
        )
        calls = b.get_table(_PROG_ARRAY.encode())
        calls[ctypes.c_int(_DIR_INGRESS)] = ctypes.c_int(fns["policy_to_pod"].fd)
        calls[ctypes.c_int(_DIR_EGRESS)] = ctypes.c_int(fns["policy_from_pod"].fd)
        for name, fn in fns.items():
            _bpfsys.obj_pin(fn.fd, str(prog_dir / name))
    finally:
        b.cleanup()


def _tail(diag: list[str], lines: int = 30) -> str:
    """The useful end of clang/verifier output: from the first error on, else the last lines
    (header warnings of the kernel tree are noise)."""
    text = "".join(diag).splitlines()
    first_error = next((i for i, ln in enumerate(text) if "error:" in ln), None)
    if first_error is not None:
        text = text[first_error:]
    return "\n".join(text[-lines:])


def load_datapath(settings: DatapathSettings | None = None) -> LoadedBuild:
    """Open the pinned build for ``settings`` or compile, pin and open it.

    State maps are never recreated here: existing ones are reused after a layout check.
    """
    settings = settings or DatapathSettings()
    started = time.monotonic()
    build = source_hash(settings)
    prog_dir = _prog_dir(settings, build)
    fds = _open_build(prog_dir)
    compiled = fds is None
    if fds is None:
        _check_pinned_maps(settings)
        shutil.rmtree(prog_dir, ignore_errors=True)  # a half-written earlier attempt
        prog_dir.mkdir(parents=True, exist_ok=True)
        try:
            _compile(settings, prog_dir)
        except BaseException:
            shutil.rmtree(prog_dir, ignore_errors=True)
            raise
        fds = _open_build(prog_dir)
        if fds is None:
            raise DatapathError(f"{prog_dir}: build pinned but cannot be opened")
    try:
        maps = DatapathMaps.open_pinned(
            settings.pin_dir,
            {n: s for n, s in settings.specs().items() if s.type != MapType.RINGBUF},
        )
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return LoadedBuild(settings, build, fds, maps, compiled, time.monotonic() - started)


def remove_pins(pin_dir: Path) -> None:
    """Unpin everything under ``pin_dir`` (uninstall, tests): state and builds are lost once
    nothing else holds them."""
    shutil.rmtree(pin_dir, ignore_errors=True)
