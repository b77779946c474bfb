"""The ctypes mirrors have the layout the compiled program sees (STYLE principle 9).

A probe program including ``bpf/flagella.h`` is generated from the mirrors'
field lists, compiled with bcc, and run once with BPF_PROG_TEST_RUN; it
writes ``sizeof`` and every ``offsetof`` into an array map, which is then
compared with ``ctypes.sizeof`` and the fields' offsets. A field the C struct
lacks fails the compile; a field the mirror lacks changes a size or offset.
The loader's own check (every pinned map's key/value size against
``MAP_SPECS``) covers the map declarations in ``flagella.c``.
"""

from __future__ import annotations

import ctypes

import pytest
from conftest_bpf import requires_root

from flagella.datapath import _bpfsys
from flagella.datapath.events import EventStruct
from flagella.datapath.layouts import LAYOUTS
from flagella.datapath.loader import DatapathSettings

pytestmark = [pytest.mark.root, requires_root]

MIRRORS: tuple[type[ctypes.Structure], ...] = (*LAYOUTS, EventStruct)


def _expected() -> list[tuple[str, int]]:
    """(label, value) in probe order: each struct's size, then each field's offset."""
    out = []
    for cls in MIRRORS:
        c_name = cls.C_NAME  # type: ignore[attr-defined]
        out.append((f"sizeof(struct {c_name})", ctypes.sizeof(cls)))
        for name, *_ in cls._fields_:
            out.append((f"offsetof(struct {c_name}, {name})", getattr(cls, name).offset))
    return out


def _probe_source(labels: list[str]) -> str:
    lines = [
        "#include <uapi/linux/bpf.h>",
        '#include "flagella.h"',
        f"BPF_ARRAY(layout, u64, {len(labels)});",
        "int probe(struct __sk_buff *skb) {",
        "    u32 i; u64 v;",
    ]
    for i, label in enumerate(labels):
        expr = label.replace("offsetof(", "__builtin_offsetof(")
        lines.append(f"    i = {i}; v = {expr}; layout.update(&i, &v);")
    lines += ["    return 0;", "}"]
    return "\n".join(lines)


def test_mirrors_match_the_compiled_layout() -> None:
    from bcc import BPF

    expected = _expected()
    source_dir = DatapathSettings().source_dir
    b = BPF(
        text=_probe_source([label for label, _ in expected]).encode(), cflags=[f"-I{source_dir}"]
    )
    try:
        fn = b.load_func(b"probe", BPF.SCHED_CLS)
        retval, _, _ = _bpfsys.prog_test_run(fn.fd, b"\0" * 64)
        assert retval == 0
        table = b.get_table(b"layout")
        seen = [int(table[ctypes.c_int(i)].value) for i in range(len(expected))]
    finally:
        b.cleanup()
    mismatches = [
        f"{label}: C {got}, ctypes {want}"
        for (label, want), got in zip(expected, seen, strict=True)
        if got != want
    ]
    assert not mismatches, "\n".join(mismatches)


def test_every_mirror_quotes_its_c_struct() -> None:
    for cls in MIRRORS:
        doc = cls.__doc__ or ""
        assert f"struct {cls.C_NAME}" in doc, cls  # type: ignore[attr-defined]
        for name, *_ in cls._fields_:
            assert name in doc, f"{cls.__name__}.{name} not in its quoted C struct"
