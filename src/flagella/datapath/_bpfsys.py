"""The bpf(2) system call through ctypes: pinned objects and map elements.

Only what Flagella needs and bcc does not give without a compile: opening a
pinned map or program (``obj_get``), pinning, element lookup/update/delete,
key iteration, the batch commands, object info, ``prog_test_run``, and tcx
attachment (bcc 0.26 has none): ``link_create``/``link_update``/``link_info``/
``link_detach`` and ``prog_query``.
Each command has its own ``bpf_attr`` variant below, laid out as in
``include/uapi/linux/bpf.h``; the kernel zero-fills whatever tail of the
union we do not pass.

Errors become :class:`BpfError` (a :class:`~flagella.errors.DatapathError`)
carrying ``errno``; a lookup or delete of a missing key is not an error here
(``None`` / ``False``).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from dataclasses import dataclass
from functools import cache

from flagella.errors import DatapathError

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "BpfError",
    "MapInfo",
    "MapType",
    "ProgInfo",
    "BPF_TCX_EGRESS",
    "BPF_TCX_INGRESS",
    "LinkInfo",
    "close",
    "link_create",
    "link_detach",
    "link_info",
    "link_update",
    "map_create",
    "map_delete",
    "map_delete_batch",
    "map_get_next_key",
    "map_info",
    "map_lookup",
    "map_lookup_batch",
    "map_update",
    "map_update_batch",
    "obj_get",
    "obj_pin",
    "possible_cpus",
    "prog_info",
    "prog_query",
    "prog_test_run",
]

_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}

# enum bpf_cmd
_MAP_CREATE = 0
_MAP_LOOKUP_ELEM = 1
_MAP_UPDATE_ELEM = 2
_MAP_DELETE_ELEM = 3
_MAP_GET_NEXT_KEY = 4
_OBJ_PIN = 6
_OBJ_GET = 7
_PROG_TEST_RUN = 10
_OBJ_GET_INFO_BY_FD = 15
_PROG_QUERY = 16
_MAP_LOOKUP_BATCH = 24
_MAP_UPDATE_BATCH = 26
_MAP_DELETE_BATCH = 27
_LINK_CREATE = 28
_LINK_UPDATE = 29
_LINK_DETACH = 34

# enum bpf_attach_type (tcx: Linux 6.6+)
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


class MapType:
    """``enum bpf_map_type`` values Flagella uses."""

    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LPM_TRIE = 11
    RINGBUF = 27


class BpfError(DatapathError):
    """A bpf(2) command failed; ``errno`` says why."""

    def __init__(self, what: str, err: int) -> None:
        self.errno = err
        super().__init__(f"{what}: {_errno.errorcode.get(err, str(err))} ({os.strerror(err)})")


class _ElemAttr(ctypes.Structure):
    # struct { __u32 map_fd; __aligned_u64 key; union { value; next_key }; __u64 flags; }
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _BatchAttr(ctypes.Structure):
    # struct { in_batch; out_batch; keys; values; __u32 count; __u32 map_fd; elem_flags; flags; } batch
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    # struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... }  /* BPF_OBJ_* */
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    # struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; } info
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _MapCreateAttr(ctypes.Structure):
    # struct { map_type; key_size; value_size; max_entries; map_flags; inner_map_fd;
    #          numa_node; char map_name[BPF_OBJ_NAME_LEN]; ... }  /* BPF_MAP_CREATE */
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


class _TestRunAttr(ctypes.Structure):
    # struct { prog_fd; retval; data_size_in; data_size_out; data_in; data_out; repeat;
    #          duration; ctx_size_in; ctx_size_out; ctx_in; ctx_out; flags; cpu; batch_size; } test
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class _LinkCreateAttr(ctypes.Structure):
    # struct { prog_fd; target_ifindex; attach_type; flags;
    #          union { ... struct { relative_fd; __u64 expected_revision; } tcx; }; } link_create
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("relative_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("expected_revision", ctypes.c_uint64),
    ]


class _LinkUpdateAttr(ctypes.Structure):
    # struct { link_fd; new_prog_fd; flags; old_prog_fd; } link_update
    _fields_ = [
        ("link_fd", ctypes.c_uint32),
        ("new_prog_fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("old_prog_fd", ctypes.c_uint32),
    ]


class _QueryAttr(ctypes.Structure):
    # struct { target_ifindex; attach_type; query_flags; attach_flags; prog_ids; prog_cnt;
    #          :32; prog_attach_flags; link_ids; link_attach_flags; revision; } query
    _fields_ = [
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("prog_attach_flags", ctypes.c_uint64),
        ("link_ids", ctypes.c_uint64),
        ("link_attach_flags", ctypes.c_uint64),
        ("revision", ctypes.c_uint64),
    ]


class _BpfLinkInfo(ctypes.Structure):
    # struct bpf_link_info { type; id; prog_id; union { ... struct { ifindex; attach_type; } tcx; } }
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("rest", ctypes.c_uint64 * 6),
    ]


class _BpfMapInfo(ctypes.Structure):
    # struct bpf_map_info { type; id; key_size; value_size; max_entries; map_flags;
    #                       char name[BPF_OBJ_NAME_LEN]; ... }  (prefix; the kernel honours info_len)
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _BpfProgInfo(ctypes.Structure):
    # struct bpf_prog_info { __u32 type; __u32 id; __u8 tag[8]; ... }  (prefix)
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
    ]


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str


@dataclass(frozen=True)
class LinkInfo:
    """``type`` 11 is a tcx link (BPF_LINK_TYPE_TCX); ``ifindex`` 0 means its device went (or it was detached)."""

    type: int
    id: int
    prog_id: int
    ifindex: int
    attach_type: int


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    tag: str


@cache
def _syscall() -> tuple[ctypes.CDLL, int]:
    machine = os.uname().machine
    if machine not in _NR_BPF:
        raise DatapathError(f"bpf(2): unsupported architecture {machine}")
    return ctypes.CDLL(None, use_errno=True), _NR_BPF[machine]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    libc, nr = _syscall()
    ret = int(libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        return -ctypes.get_errno()
    return ret


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise BpfError(what, -ret)
    return ret


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


def obj_get(path: str) -> int:
    """Open a pinned map or program; returns a new fd (close it with :func:`close`)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _check(_bpf(_OBJ_GET, _ObjAttr(pathname=_addr(p))), f"obj_get {path}")


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _check(_bpf(_OBJ_PIN, _ObjAttr(pathname=_addr(p), bpf_fd=fd)), f"obj_pin {path}")


def close(fd: int) -> None:
    os.close(fd)


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0, name: str = ""
) -> int:
    attr = _MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode()[:15],
    )
    return _check(_bpf(_MAP_CREATE, attr), f"map_create {name or map_type}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value for ``key`` (``value_size`` bytes; per-CPU maps need all CPUs' room), or None."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    ret = _bpf(_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=_addr(k), value=_addr(v)))
    if ret == -_errno.ENOENT:
        return None
    _check(ret, "map_lookup")
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _ElemAttr(map_fd=fd, key=_addr(k), value=_addr(v), flags=flags)
    _check(_bpf(_MAP_UPDATE_ELEM, attr), "map_update")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False if it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    ret = _bpf(_MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=_addr(k)))
    if ret == -_errno.ENOENT:
        return False
    _check(ret, "map_delete")
    return True


def map_get_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after ``key`` (the first key if None), or None at the end."""
    k = None if key is None else ctypes.create_string_buffer(key, len(key))
    nk = ctypes.create_string_buffer(key_size)
    ret = _bpf(_MAP_GET_NEXT_KEY, _ElemAttr(map_fd=fd, key=_addr(k), value=_addr(nk)))
    if ret == -_errno.ENOENT:
        return None
    _check(ret, "map_get_next_key")
    return nk.raw


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int, flags: int = BPF_ANY) -> int:
    """Update ``count`` packed keys/values in one call; returns how many were applied."""
    k = ctypes.create_string_buffer(keys, len(keys))
    v = ctypes.create_string_buffer(values, len(values))
    attr = _BatchAttr(keys=_addr(k), values=_addr(v), count=count, map_fd=fd, elem_flags=flags)
    ret = _bpf(_MAP_UPDATE_BATCH, attr)
    if ret < 0:
        raise BpfError(f"map_update_batch (applied {attr.count} of {count})", -ret)
    return int(attr.count)


def map_delete_batch(fd: int, keys: bytes, count: int) -> int:
    """Delete ``count`` packed keys; stops at the first missing key (ENOENT) and says how far."""
    k = ctypes.create_string_buffer(keys, len(keys))
    attr = _BatchAttr(keys=_addr(k), count=count, map_fd=fd)
    ret = _bpf(_MAP_DELETE_BATCH, attr)
    if ret < 0 and ret != -_errno.ENOENT:
        raise BpfError("map_delete_batch", -ret)
    return int(attr.count)


def map_lookup_batch(
    fd: int, key_size: int, value_size: int, chunk: int = 256
) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash-type map, ``chunk`` entries per call.

    Raises BpfError(EINVAL/ENOTSUPP) for map types without batch support; callers fall back
    to key iteration.
    """
    out: list[tuple[bytes, bytes]] = []
    in_batch = ctypes.create_string_buffer(max(key_size, 8))
    out_batch = ctypes.create_string_buffer(max(key_size, 8))
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    first = True
    while True:
        attr = _BatchAttr(
            in_batch=0 if first else _addr(in_batch),
            out_batch=_addr(out_batch),
            keys=_addr(keys),
            values=_addr(values),
            count=chunk,
            map_fd=fd,
        )
        ret = _bpf(_MAP_LOOKUP_BATCH, attr)
        if ret == -_errno.ENOSPC and attr.count == 0:
            # One hash bucket holds more entries than fit: retry with more room.
            chunk *= 2
            keys = ctypes.create_string_buffer(key_size * chunk)
            values = ctypes.create_string_buffer(value_size * chunk)
            continue
        if ret < 0 and ret != -_errno.ENOENT:
            raise BpfError("map_lookup_batch", -ret)
        n = int(attr.count)
        kr, vr = keys.raw, values.raw
        for i in range(n):
            out.append(
                (kr[i * key_size : (i + 1) * key_size], vr[i * value_size : (i + 1) * value_size])
            )
        if ret == -_errno.ENOENT:
            return out
        ctypes.memmove(in_batch, out_batch, len(out_batch))
        first = False


def map_info(fd: int) -> MapInfo:
    info = _BpfMapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _check(_bpf(_OBJ_GET_INFO_BY_FD, attr), "obj_get_info_by_fd (map)")
    return MapInfo(
        type=info.type,
        id=info.id,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        map_flags=info.map_flags,
        name=info.name.decode(errors="replace"),
    )


def prog_info(fd: int) -> ProgInfo:
    info = _BpfProgInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _check(_bpf(_OBJ_GET_INFO_BY_FD, attr), "obj_get_info_by_fd (prog)")
    return ProgInfo(type=info.type, id=info.id, tag=bytes(info.tag).hex())


def prog_test_run(
    prog_fd: int, packet: bytes, ctx: bytes | None = None
) -> tuple[int, bytes, bytes]:
    """Run a program once on ``packet`` (BPF_PROG_TEST_RUN).

    ``ctx`` is an optional context prefix (for tc: ``struct __sk_buff`` up to ``ifindex``);
    returns (retval, packet out, context out as the kernel fills it).
    """
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    ctx_in = None if ctx is None else ctypes.create_string_buffer(ctx, len(ctx))
    ctx_out = None if ctx is None else ctypes.create_string_buffer(1024)  # the whole context
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_size_out=len(data_out),
        data_in=_addr(data_in),
        data_out=_addr(data_out),
        repeat=1,
        ctx_size_in=0 if ctx is None else len(ctx),
        ctx_in=_addr(ctx_in),
        ctx_size_out=0 if ctx_out is None else len(ctx_out),
        ctx_out=_addr(ctx_out),
    )
    _check(_bpf(_PROG_TEST_RUN, attr), "prog_test_run")
    return (
        int(attr.retval),
        data_out.raw[: attr.data_size_out],
        b"" if ctx_out is None else ctx_out.raw[: attr.ctx_size_out],
    )


@cache
def possible_cpus() -> int:
    """Number of possible CPUs: the number of slots in a per-CPU map value."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


def link_create(prog_fd: int, ifindex: int, attach_type: int) -> int:
    """Attach a program with a BPF link (tcx: BPF_TCX_INGRESS/EGRESS) in the caller's netns;
    returns the link's fd. The attachment lives while the fd or a pin of it does."""
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_ifindex=ifindex, attach_type=attach_type)
    return _check(_bpf(_LINK_CREATE, attr), f"link_create ifindex {ifindex} type {attach_type}")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the program of a link atomically (no packet sees neither)."""
    _check(_bpf(_LINK_UPDATE, _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd)), "link_update")


def link_detach(link_fd: int) -> None:
    """Detach a link now. Dropping its last reference (closing the fd, unlinking the pin)
    detaches it too, but later: the release runs from an RCU callback and a workqueue."""
    _check(_bpf(_LINK_DETACH, _LinkUpdateAttr(link_fd=link_fd)), "link_detach")


def link_info(fd: int) -> LinkInfo:
    info = _BpfLinkInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _check(_bpf(_OBJ_GET_INFO_BY_FD, attr), "obj_get_info_by_fd (link)")
    return LinkInfo(info.type, info.id, info.prog_id, info.ifindex, info.attach_type)


def prog_query(ifindex: int, attach_type: int, room: int = 64) -> list[int]:
    """Ids of the programs attached to ``ifindex`` (caller's netns) at ``attach_type``, in run
    order; [] when the device has none."""
    ids = (ctypes.c_uint32 * room)()
    attr = _QueryAttr(
        target_ifindex=ifindex, attach_type=attach_type, prog_ids=ctypes.addressof(ids), prog_cnt=room
    )
    _check(_bpf(_PROG_QUERY, attr), f"prog_query ifindex {ifindex} type {attach_type}")
    return [int(ids[i]) for i in range(min(int(attr.prog_cnt), room))]
