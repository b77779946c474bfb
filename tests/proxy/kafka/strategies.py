"""Hypothesis strategies for any Kafka message, built from its definition."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from flagella.proxy.kafka._schema import FieldSpec, MessageSpec

_INTS = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
}


def scalar(type_: str) -> st.SearchStrategy[Any]:
    if type_ in _INTS:
        lo, hi = _INTS[type_]
        return st.integers(lo, hi)
    if type_ == "bool":
        return st.booleans()
    if type_ == "float64":
        return st.floats(allow_nan=False)
    if type_ == "uuid":
        return st.binary(min_size=16, max_size=16)
    if type_ == "string":
        return st.text(max_size=12)
    return st.binary(max_size=24)


def value(field: FieldSpec, version: int, flexible: bool) -> st.SearchStrategy[Any]:
    if field.is_array:
        element = (
            struct(field.fields, version, flexible) if field.fields is not None
            else scalar(field.element)
        )
        base: st.SearchStrategy[Any] = st.lists(element, max_size=3)
    elif field.fields is not None:
        base = struct(field.fields, version, flexible)
    else:
        base = scalar(field.type)
    if version in field.nullable:
        return st.none() | base
    return base


def struct(fields: tuple[FieldSpec, ...], version: int, flexible: bool) -> st.SearchStrategy[Any]:
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in fields:
        if version not in field.versions:
            continue
        s = value(field, version, flexible)
        if flexible and version in field.tagged:
            optional[field.name] = s
        else:
            required[field.name] = s
    if flexible:
        optional["_tagged"] = st.lists(
            st.tuples(st.integers(1000, 1100), st.binary(max_size=6)),
            min_size=1, max_size=2, unique_by=lambda t: t[0],
        ).map(sorted)
    return st.fixed_dictionaries(required, optional=optional)


def message(spec: MessageSpec) -> st.SearchStrategy[tuple[int, dict[str, Any]]]:
    """(version, body) of any valid version of ``spec``."""
    hi = spec.max_version
    return st.integers(spec.valid.lo, hi).flatmap(
        lambda v: st.tuples(st.just(v), struct(spec.fields, v, v in spec.flexible))
    )
