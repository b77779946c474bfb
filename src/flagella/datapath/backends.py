"""Map backends: bytes in, bytes out, with the kernel's semantics.

The second of the three layers of `flagella.datapath.maps`. :class:`MapBackend`
is the interface (update flags, errno on a full hash, LPM longest-prefix
lookup, LRU eviction, per-CPU values as one slot per CPU). :class:`KernelMap`
is a pinned map through bpf(2); :class:`DictMap` is its in-memory twin for fast
tests of the code above. Both pass the same tests
(``tests/datapath/test_bpf_maps.py``).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from flagella.datapath import _bpfsys
from flagella.datapath._bpfsys import BPF_ANY, BPF_EXIST, BPF_NOEXIST, BpfError, MapType
from flagella.datapath.layouts import _ARRAY_TYPES, _BATCH_TYPES, _PERCPU_TYPES, MapSpec
from flagella.errors import DatapathError


@runtime_checkable
class MapBackend(Protocol):
    """One map, bytes in and bytes out, with the kernel's semantics.

    ``value_size`` is the size of one CPU's value; a per-CPU map (``cpus`` > 1) takes and
    returns ``cpus`` slots of ``value_size`` rounded up to 8 bytes. Errors are
    :class:`~flagella.datapath._bpfsys.BpfError` with the kernel's errno.
    """

    @property
    def key_size(self) -> int: ...

    @property
    def value_size(self) -> int: ...

    @property
    def cpus(self) -> int: ...

    def lookup(self, key: bytes) -> bytes | None: ...

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None: ...

    def delete(self, key: bytes) -> bool: ...

    def keys(self) -> Iterator[bytes]: ...

    def items(self) -> list[tuple[bytes, bytes]]: ...

    def update_many(self, pairs: Iterable[tuple[bytes, bytes]]) -> int: ...

    def delete_many(self, keys: Iterable[bytes]) -> int: ...

    def close(self) -> None: ...


def _slot(value_size: int) -> int:
    return (value_size + 7) & ~7


class KernelMap:
    """A BPF map reached through bpf(2), usually opened from its pin."""

    def __init__(self, fd: int, name: str = "") -> None:
        self._fd = fd
        info = _bpfsys.map_info(fd)
        self.info = info
        self.name = name or info.name
        self._cpus = _bpfsys.possible_cpus() if info.type in _PERCPU_TYPES else 1
        self._batch = info.type in _BATCH_TYPES
        self._batch_delete = self._batch and info.type not in _ARRAY_TYPES

    @classmethod
    def open_pinned(cls, path: str | Path, expect: MapSpec | None = None) -> KernelMap:
        """Open the map pinned at ``path``; with ``expect``, refuse one of another layout."""
        fd = _bpfsys.obj_get(str(path))
        m = cls(fd, Path(path).name)
        if expect is not None:
            try:
                check_compatible(m.info, expect, str(path))
            except DatapathError:
                m.close()
                raise
        return m

    @classmethod
    def create(cls, spec: MapSpec) -> KernelMap:
        """A new unpinned map of ``spec`` (tests, scratch)."""
        fd = _bpfsys.map_create(
            spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, spec.name
        )
        return cls(fd, spec.name)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def key_size(self) -> int:
        return self.info.key_size

    @property
    def value_size(self) -> int:
        return self.info.value_size

    @property
    def cpus(self) -> int:
        return self._cpus

    def _full_value_size(self) -> int:
        return self.value_size if self._cpus == 1 else _slot(self.value_size) * self._cpus

    def lookup(self, key: bytes) -> bytes | None:
        return _bpfsys.map_lookup(self._fd, key, self._full_value_size())

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        _bpfsys.map_update(self._fd, key, value, flags)

    def delete(self, key: bytes) -> bool:
        return _bpfsys.map_delete(self._fd, key)

    def keys(self) -> Iterator[bytes]:
        key = _bpfsys.map_get_next_key(self._fd, None, self.key_size)
        while key is not None:
            yield key
            key = _bpfsys.map_get_next_key(self._fd, key, self.key_size)

    def items(self) -> list[tuple[bytes, bytes]]:
        if self._batch:
            try:
                return _bpfsys.map_lookup_batch(self._fd, self.key_size, self._full_value_size())
            except BpfError:
                self._batch = False  # kernel without batch ops for this type
        out = []
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:  # deleted meanwhile
                out.append((k, v))
        return out

    def update_many(self, pairs: Iterable[tuple[bytes, bytes]]) -> int:
        pairs = list(pairs)
        if not pairs:
            return 0
        if self._batch:
            try:
                return _bpfsys.map_update_batch(
                    self._fd,
                    b"".join(k for k, _ in pairs),
                    b"".join(v for _, v in pairs),
                    len(pairs),
                )
            except BpfError as e:
                if e.errno not in (22, 95, 524):  # EINVAL, EOPNOTSUPP, ENOTSUPP
                    raise
                self._batch = False
        for k, v in pairs:
            self.update(k, v)
        return len(pairs)

    def delete_many(self, keys: Iterable[bytes]) -> int:
        """Delete in batches (BPF_MAP_DELETE_BATCH); a missing key is skipped, not an error."""
        keys = list(keys)
        if not self._batch_delete:
            return sum(1 for k in keys if self.delete(k))
        deleted = start = 0
        while start < len(keys):
            try:
                n = _bpfsys.map_delete_batch(self._fd, b"".join(keys[start:]), len(keys) - start)
            except BpfError as e:
                if e.errno not in (22, 95, 524):  # EINVAL, EOPNOTSUPP, ENOTSUPP
                    raise
                self._batch_delete = False
                return deleted + sum(1 for k in keys[start:] if self.delete(k))
            deleted += n
            start += n + 1  # the batch stops at a missing key: skip it
        return deleted

    def close(self) -> None:
        if self._fd >= 0:
            _bpfsys.close(self._fd)
            self._fd = -1

    def __enter__(self) -> KernelMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_compatible(info: _bpfsys.MapInfo, spec: MapSpec, where: str) -> None:
    """Raise DatapathError if a pinned map does not have the layout ``spec`` describes."""
    problems = []
    for what, have, want in (
        ("type", info.type, spec.type),
        ("key size", info.key_size, spec.key_size),
        ("value size", info.value_size, spec.value_size),
        ("max entries", info.max_entries, spec.max_entries),
        ("flags", info.map_flags, spec.flags),
    ):
        if have != want:
            problems.append(f"{what} {have} (expected {want})")
    if problems:
        raise DatapathError(
            f"pinned map {where} has another layout: {', '.join(problems)}; "
            "remove it to let the datapath recreate it (its state is lost)"
        )


class DictMap:
    """In-memory twin of a BPF map of ``spec``'s type, errno for errno.

    HASH and PERCPU_HASH refuse a new key when full (E2BIG); LRU_HASH evicts the least
    recently updated entry (the kernel also counts the program's lookups, which user space
    cannot see); ARRAY has every index from the start and cannot delete (EINVAL);
    LPM_TRIE looks up the longest stored prefix (keys are ``u32 prefixlen`` + address).
    """

    def __init__(self, spec: MapSpec, cpus: int = 1) -> None:
        self.spec = spec
        self.name = spec.name
        self._cpus = cpus if spec.type in _PERCPU_TYPES else 1
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        if spec.type in _ARRAY_TYPES:
            zero = bytes(self._full_value_size())
            for i in range(spec.max_entries):
                self._data[i.to_bytes(4, sys.byteorder)] = zero

    @property
    def key_size(self) -> int:
        return self.spec.key_size

    @property
    def value_size(self) -> int:
        return self.spec.value_size

    @property
    def cpus(self) -> int:
        return self._cpus

    def _full_value_size(self) -> int:
        return self.value_size if self._cpus == 1 else _slot(self.value_size) * self._cpus

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise BpfError(f"{self.name}: key of {len(key)} bytes", 22)

    def lookup(self, key: bytes) -> bytes | None:
        self._check_key(key)
        if self.spec.type == MapType.LPM_TRIE:
            return self._lpm_lookup(key)
        return self._data.get(key)  # like bpf(2) lookups, this does not refresh LRU order

    def _lpm_lookup(self, key: bytes) -> bytes | None:
        plen = int.from_bytes(key[:4], sys.byteorder)
        addr = int.from_bytes(key[4:], "big")
        width = (len(key) - 4) * 8
        for n in range(min(plen, width), -1, -1):
            masked = addr & ~((1 << (width - n)) - 1) if n else 0
            k = n.to_bytes(4, sys.byteorder) + masked.to_bytes(width // 8, "big")
            v = self._data.get(k)
            if v is not None:
                return v
        return None

    def _lpm_normal(self, key: bytes) -> bytes:
        # The kernel matches only the first prefixlen bits; store the key with the rest zeroed.
        plen = int.from_bytes(key[:4], sys.byteorder)
        width = (len(key) - 4) * 8
        if plen > width:
            raise BpfError(f"{self.name}: prefixlen {plen}", 22)
        addr = int.from_bytes(key[4:], "big")
        masked = addr & ~((1 << (width - plen)) - 1) if plen else 0
        return key[:4] + masked.to_bytes(width // 8, "big")

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._check_key(key)
        if len(value) != self._full_value_size():
            raise BpfError(f"{self.name}: value of {len(value)} bytes", 22)
        if self.spec.type == MapType.LPM_TRIE:
            key = self._lpm_normal(key)
        exists = key in self._data
        if self.spec.type in _ARRAY_TYPES:
            if not exists:
                raise BpfError(f"{self.name}: index out of range", 7)  # E2BIG
            if flags == BPF_NOEXIST:
                raise BpfError(f"{self.name}: update", 17)  # EEXIST
        elif flags == BPF_NOEXIST and exists:
            raise BpfError(f"{self.name}: update", 17)
        elif flags == BPF_EXIST and not exists:
            raise BpfError(f"{self.name}: update", 2)  # ENOENT
        if not exists and len(self._data) >= self.spec.max_entries:
            if self.spec.type == MapType.LRU_HASH:
                self._data.popitem(last=False)
            else:
                raise BpfError(f"{self.name}: map full", 7)  # E2BIG
        self._data[key] = bytes(value)
        if self.spec.type == MapType.LRU_HASH:
            self._data.move_to_end(key)

    def delete(self, key: bytes) -> bool:
        self._check_key(key)
        if self.spec.type in _ARRAY_TYPES:
            raise BpfError(f"{self.name}: delete from array", 22)
        if self.spec.type == MapType.LPM_TRIE:
            key = self._lpm_normal(key)
        return self._data.pop(key, None) is not None

    def keys(self) -> Iterator[bytes]:
        yield from list(self._data)

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self._data.items())

    def update_many(self, pairs: Iterable[tuple[bytes, bytes]]) -> int:
        n = 0
        for k, v in pairs:
            self.update(k, v)
            n += 1
        return n

    def delete_many(self, keys: Iterable[bytes]) -> int:
        return sum(1 for k in keys if self.delete(k))

    def close(self) -> None:
        pass
