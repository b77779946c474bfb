"""Kafka's wire encoding, driven by `FieldSpec` trees.

Theory of operation
-------------------
A message body is a struct: its fields in definition order, each present only
in the versions it lists. Classic versions use fixed-width lengths (int16 for
strings, int32 for bytes and arrays, -1 for null). Flexible versions (KIP-482)
use *compact* lengths (unsigned varint of length + 1, 0 for null) and end every
struct with a tagged-field section: a uvarint count, then (tag, size, value)
triples in ascending tag order. A field whose ``taggedVersions`` include the
version lives in that section instead of in line.

A decoded struct is a ``dict`` from field name to value: ints, floats, bools,
``str``, ``bytes`` (uuid, bytes, records), ``list`` and nested ``dict``, or None.
A tagged field appears in the dict only if it was on the wire; tags this
definition does not know are kept under the key ``"_tagged"`` as (tag, bytes)
pairs. Encoding writes what the dict holds, the field's default for what it
lacks, and exactly the tagged fields present, so decode then encode gives back
the same bytes.

Every malformed input raises `KafkaDecodeError` naming the field path
(``TopicData[0].PartitionData[1].Records: truncated``); nothing else escapes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from flagella.errors import FlagellaError
from flagella.proxy.kafka._schema import FieldSpec

Struct = dict[str, Any]


class KafkaDecodeError(FlagellaError):
    """Bytes that are not a valid Kafka frame of the expected type; ``path`` names the field."""

    def __init__(self, reason: str, path: str = "") -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)

    def within(self, name: str) -> KafkaDecodeError:
        return KafkaDecodeError(self.reason, f"{name}.{self.path}" if self.path else name)


class KafkaEncodeError(FlagellaError):
    """A value does not fit its field (wrong type, null where not nullable, out of range)."""


_FIXED: Final[dict[str, struct.Struct]] = {
    "bool": struct.Struct(">?"),
    "int8": struct.Struct(">b"),
    "int16": struct.Struct(">h"),
    "int32": struct.Struct(">i"),
    "int64": struct.Struct(">q"),
    "uint16": struct.Struct(">H"),
    "uint32": struct.Struct(">I"),
    "float64": struct.Struct(">d"),
}
_I16: Final = _FIXED["int16"]
_I32: Final = _FIXED["int32"]
_I8: Final = _FIXED["int8"]


class Reader:
    """A cursor over bytes; every read checks bounds."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.end - self.pos:
            raise KafkaDecodeError("truncated")
        start = self.pos
        self.pos += n
        return bytes(self.buf[start : self.pos])

    def view(self, n: int) -> memoryview:
        """`take` without the copy: a read-only view into the buffer."""
        if n < 0 or n > self.end - self.pos:
            raise KafkaDecodeError("truncated")
        start = self.pos
        self.pos += n
        return memoryview(self.buf)[start : self.pos].toreadonly()

    def fixed(self, fmt: struct.Struct) -> Any:
        if fmt.size > self.end - self.pos:
            raise KafkaDecodeError("truncated")
        value = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos += fmt.size
        return value

    def uvarint(self) -> int:
        pos = self.pos
        if pos < self.end and self.buf[pos] < 0x80:  # one byte: nearly every length and count
            self.pos = pos + 1
            return int(self.buf[pos])
        value = 0
        for shift in range(0, 35, 7):
            if self.pos >= self.end:
                raise KafkaDecodeError("truncated")
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > 0xFFFFFFFF:
                    raise KafkaDecodeError("varint out of range")
                return value
        raise KafkaDecodeError("varint longer than 5 bytes")


def write_uvarint(out: bytearray, value: int) -> None:
    if value < 0 or value > 0xFFFFFFFF:
        raise KafkaEncodeError(f"varint {value} out of range")
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _flexible(field: FieldSpec, version: int, flexible: bool) -> bool:
    return version in field.flexible if field.flexible is not None else flexible


# -- decoding ---------------------------------------------------------------------------
#
# The tree is compiled once per (struct, version, flexible) into closures: a `_StructPlan`
# holds, in wire order, each present field's name and a decoder that reads its value, so
# decoding walks no version range and dispatches on no type name. The closures raise
# exactly what an interpreter of the tree would, with the same field paths.

_Decoder = Callable[[Reader], Any]


@dataclass(frozen=True, slots=True)
class _StructPlan:
    inline: tuple[tuple[str, _Decoder], ...]
    tagged: Mapping[int, tuple[str, _Decoder]]  # tag -> name, decoder (in a sub-reader)
    flexible: bool


#: (id(fields), version, flexible) -> (fields, plan); fields kept so the id stays theirs.
_PLANS: dict[tuple[int, int, bool], tuple[Sequence[FieldSpec], _StructPlan]] = {}


def _length(r: Reader, compact: bool, classic: struct.Struct) -> int:
    """A length prefix: -1 stands for null."""
    if compact:
        return r.uvarint() - 1
    value: int = r.fixed(classic)
    if value < -1:
        raise KafkaDecodeError(f"negative length {value}")
    return value


def _scalar_decoder(type_: str, compact: bool, nullable: bool) -> _Decoder:
    fmt = _FIXED.get(type_)
    if fmt is not None:
        size = fmt.size
        unpack = fmt.unpack_from

        def fixed(r: Reader) -> Any:
            pos = r.pos
            if size > r.end - pos:
                raise KafkaDecodeError("truncated")
            r.pos = pos + size
            return unpack(r.buf, pos)[0]

        return fixed
    if type_ == "uuid":
        return lambda r: r.take(16)
    if type_ == "string":

        def string(r: Reader) -> str | None:
            n = _length(r, compact, _I16)
            if n < 0:
                if not nullable:
                    raise KafkaDecodeError("null in a non-nullable string")
                return None
            try:
                return r.take(n).decode("utf-8")
            except UnicodeDecodeError:
                raise KafkaDecodeError("string is not UTF-8") from None

        return string

    # Records (a produce batch: nearly every byte of a large request) stay a view into the
    # frame, which is never mutated; other bytes are copied (they are small, and kept).
    take = Reader.view if type_ == "records" else Reader.take

    def blob(r: Reader) -> bytes | memoryview | None:  # bytes, records
        n = _length(r, compact, _I32)
        if n < 0:
            if not nullable:
                raise KafkaDecodeError("null in non-nullable bytes")
            return None
        return take(r, n)

    return blob


def _value_decoder(field: FieldSpec, version: int, flexible: bool) -> _Decoder:
    compact = _flexible(field, version, flexible)
    nullable = version in field.nullable
    if field.is_array:
        if field.fields is not None:
            plan = _struct_plan(field.fields, version, flexible)

            def element(r: Reader, i: int) -> Any:
                try:
                    return _run(plan, r)
                except KafkaDecodeError as exc:
                    raise exc.within(f"[{i}]") from None
        else:
            scalar = _scalar_decoder(field.element, compact, False)

            def element(r: Reader, i: int) -> Any:
                return scalar(r)

        def array(r: Reader) -> list[Any] | None:
            n = _length(r, compact, _I32)
            if n < 0:
                if not nullable:
                    raise KafkaDecodeError("null in a non-nullable array")
                return None
            if n > r.end - r.pos:
                raise KafkaDecodeError(f"array of {n} elements in {r.end - r.pos} bytes")
            return [element(r, i) for i in range(n)]

        return array
    if field.fields is not None:
        plan = _struct_plan(field.fields, version, flexible)
        if not nullable:
            return lambda r: _run(plan, r)

        def nullable_struct(r: Reader) -> Struct | None:
            if r.fixed(_I8) < 0:
                return None
            return _run(plan, r)

        return nullable_struct
    return _scalar_decoder(field.type, compact, nullable)


def _struct_plan(fields: Sequence[FieldSpec], version: int, flexible: bool) -> _StructPlan:
    key = (id(fields), version, flexible)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is fields:
        return hit[1]
    inline: list[tuple[str, _Decoder]] = []
    tagged: dict[int, tuple[str, _Decoder]] = {}
    for field in fields:
        if version not in field.versions:
            continue
        if flexible and version in field.tagged:
            assert field.tag is not None
            tagged[field.tag] = (field.name, _value_decoder(field, version, True))
            continue
        inline.append((field.name, _value_decoder(field, version, flexible)))
    plan = _StructPlan(tuple(inline), tagged, flexible)
    _PLANS[key] = (fields, plan)
    return plan


def _run(plan: _StructPlan, r: Reader) -> Struct:
    out: Struct = {}
    for name, decode in plan.inline:
        try:
            out[name] = decode(r)
        except KafkaDecodeError as exc:
            raise exc.within(name) from None
    if plan.flexible:
        _decode_tagged(plan.tagged, r, out)
    return out


def decode_struct(
    fields: Sequence[FieldSpec], version: int, flexible: bool, r: Reader
) -> Struct:
    return _run(_struct_plan(fields, version, flexible), r)


def _decode_tagged(tagged: Mapping[int, tuple[str, _Decoder]], r: Reader, out: Struct) -> None:
    count = r.uvarint()
    if count > r.remaining:
        raise KafkaDecodeError(f"{count} tagged fields in {r.remaining} bytes")
    if not count:
        return
    unknown: list[tuple[int, bytes]] = []
    last = -1
    for _ in range(count):
        tag = r.uvarint()
        size = r.uvarint()
        if tag <= last:
            raise KafkaDecodeError(f"tagged field {tag} out of order")
        last = tag
        known = tagged.get(tag)
        if known is None:
            unknown.append((tag, r.take(size)))
            continue
        name, decode = known
        if size > r.remaining:
            raise KafkaDecodeError("truncated", name)
        sub = Reader(r.buf, r.pos, r.pos + size)
        try:
            out[name] = decode(sub)
        except KafkaDecodeError as exc:
            raise exc.within(name) from None
        if sub.pos != sub.end:
            raise KafkaDecodeError(f"{sub.end - sub.pos} bytes left over", name)
        r.pos += size
    if unknown:
        out["_tagged"] = unknown


# -- encoding ---------------------------------------------------------------------------


def default_value(field: FieldSpec, version: int) -> Any:
    """The value a field takes when the message does not set it (Kafka's defaults)."""
    text = field.default
    nullable = version in field.nullable
    if text == "null" and nullable:
        return None
    if field.is_array:
        return []
    if field.fields is not None:
        return {}
    type_ = field.type
    if type_ == "bool":
        return text == "true"
    if type_ == "float64":
        return float(text) if text else 0.0
    if type_ in _FIXED:
        return int(text, 0) if text else 0
    if type_ == "uuid":
        return bytes(16)
    if type_ == "string":
        return text or ""
    return b""


def _write_length(out: bytearray, n: int, compact: bool, classic: struct.Struct) -> None:
    if compact:
        write_uvarint(out, n + 1)
    else:
        out += classic.pack(n)


def _encode_scalar(type_: str, value: Any, out: bytearray, compact: bool, nullable: bool) -> None:
    fmt = _FIXED.get(type_)
    if fmt is not None:
        try:
            out += fmt.pack(value)
        except struct.error as exc:
            raise KafkaEncodeError(f"{value!r} is not a {type_}: {exc}") from None
        return
    if type_ == "uuid":
        if not isinstance(value, bytes | bytearray) or len(value) != 16:
            raise KafkaEncodeError(f"{value!r} is not a 16-byte uuid")
        out += value
        return
    if value is None:
        if not nullable:
            raise KafkaEncodeError(f"null in a non-nullable {type_}")
        _write_length(out, -1, compact, _I16 if type_ == "string" else _I32)
        return
    if type_ == "string":
        if not isinstance(value, str):
            raise KafkaEncodeError(f"{value!r} is not a string")
        data = value.encode("utf-8")
        if not compact and len(data) > 0x7FFF:
            raise KafkaEncodeError("string longer than 32767 bytes")
        _write_length(out, len(data), compact, _I16)
        out += data
        return
    if not isinstance(value, bytes | bytearray | memoryview):
        raise KafkaEncodeError(f"{type_} value is not bytes")
    _write_length(out, len(value), compact, _I32)
    out += value


def _encode_value(field: FieldSpec, version: int, flexible: bool, value: Any, out: bytearray) -> None:
    compact = _flexible(field, version, flexible)
    nullable = version in field.nullable
    if field.is_array:
        if value is None:
            if not nullable:
                raise KafkaEncodeError(f"{field.name}: null in a non-nullable array")
            _write_length(out, -1, compact, _I32)
            return
        _write_length(out, len(value), compact, _I32)
        if field.fields is not None:
            for item in value:
                encode_struct(field.fields, version, flexible, item, out)
        else:
            for item in value:
                _encode_scalar(field.element, item, out, compact, False)
        return
    if field.fields is not None:
        if nullable:
            out += _I8.pack(-1 if value is None else 1)
            if value is None:
                return
        elif value is None:
            raise KafkaEncodeError(f"{field.name}: null in a non-nullable struct")
        encode_struct(field.fields, version, flexible, value, out)
        return
    _encode_scalar(field.type, value, out, compact, nullable)


def encode_struct(
    fields: Sequence[FieldSpec], version: int, flexible: bool, value: Mapping[str, Any],
    out: bytearray,
) -> None:
    tagged: list[tuple[int, bytes]] = []
    for field in fields:
        if version not in field.versions:
            continue
        if flexible and version in field.tagged:
            if field.name in value:
                assert field.tag is not None
                sub = bytearray()
                _encode_value(field, version, True, value[field.name], sub)
                tagged.append((field.tag, bytes(sub)))
            continue
        item = value[field.name] if field.name in value else default_value(field, version)
        try:
            _encode_value(field, version, flexible, item, out)
        except KafkaEncodeError as exc:
            raise KafkaEncodeError(f"{field.name}: {exc}") from None
    if flexible:
        tagged.extend(value.get("_tagged", ()))
        tagged.sort()
        write_uvarint(out, len(tagged))
        for tag, data in tagged:
            write_uvarint(out, tag)
            write_uvarint(out, len(data))
            out += data
