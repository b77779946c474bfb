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
from collections.abc import Mapping, Sequence
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

    def fixed(self, fmt: struct.Struct) -> Any:
        if fmt.size > self.end - self.pos:
            raise KafkaDecodeError("truncated")
        value = fmt.unpack_from(self.buf, self.pos)[0]
        self.pos += fmt.size
        return value

    def uvarint(self) -> int:
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


def _length(r: Reader, compact: bool, classic: struct.Struct) -> int:
    """A length prefix: -1 stands for null."""
    if compact:
        return r.uvarint() - 1
    value: int = r.fixed(classic)
    if value < -1:
        raise KafkaDecodeError(f"negative length {value}")
    return value


def _decode_scalar(type_: str, r: Reader, compact: bool, nullable: bool) -> Any:
    fmt = _FIXED.get(type_)
    if fmt is not None:
        return r.fixed(fmt)
    if type_ == "uuid":
        return r.take(16)
    if type_ == "string":
        n = _length(r, compact, _I16)
        if n < 0:
            if not nullable:
                raise KafkaDecodeError("null in a non-nullable string")
            return None
        try:
            return r.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise KafkaDecodeError("string is not UTF-8") from None
    # bytes, records
    n = _length(r, compact, _I32)
    if n < 0:
        if not nullable:
            raise KafkaDecodeError("null in non-nullable bytes")
        return None
    return r.take(n)


def _decode_value(field: FieldSpec, version: int, flexible: bool, r: Reader) -> Any:
    compact = _flexible(field, version, flexible)
    nullable = version in field.nullable
    if field.is_array:
        n = _length(r, compact, _I32)
        if n < 0:
            if not nullable:
                raise KafkaDecodeError("null in a non-nullable array")
            return None
        if n > r.remaining:
            raise KafkaDecodeError(f"array of {n} elements in {r.remaining} bytes")
        if field.fields is not None:
            items = []
            for i in range(n):
                try:
                    items.append(decode_struct(field.fields, version, flexible, r))
                except KafkaDecodeError as exc:
                    raise exc.within(f"[{i}]") from None
            return items
        return [_decode_scalar(field.element, r, compact, False) for _ in range(n)]
    if field.fields is not None:
        if nullable and r.fixed(_I8) < 0:
            return None
        return decode_struct(field.fields, version, flexible, r)
    return _decode_scalar(field.type, r, compact, nullable)


def decode_struct(
    fields: Sequence[FieldSpec], version: int, flexible: bool, r: Reader
) -> Struct:
    out: Struct = {}
    tagged: dict[int, FieldSpec] = {}
    for field in fields:
        if version not in field.versions:
            continue
        if flexible and version in field.tagged:
            assert field.tag is not None
            tagged[field.tag] = field
            continue
        try:
            out[field.name] = _decode_value(field, version, flexible, r)
        except KafkaDecodeError as exc:
            raise exc.within(field.name) from None
    if flexible:
        _decode_tagged(tagged, version, r, out)
    return out


def _decode_tagged(tagged: Mapping[int, FieldSpec], version: int, r: Reader, out: Struct) -> None:
    count = r.uvarint()
    if count > r.remaining:
        raise KafkaDecodeError(f"{count} tagged fields in {r.remaining} bytes")
    unknown: list[tuple[int, bytes]] = []
    last = -1
    for _ in range(count):
        tag = r.uvarint()
        size = r.uvarint()
        if tag <= last:
            raise KafkaDecodeError(f"tagged field {tag} out of order")
        last = tag
        field = tagged.get(tag)
        if field is None:
            unknown.append((tag, r.take(size)))
            continue
        if size > r.remaining:
            raise KafkaDecodeError("truncated", field.name)
        sub = Reader(r.buf, r.pos, r.pos + size)
        try:
            out[field.name] = _decode_value(field, version, True, sub)
        except KafkaDecodeError as exc:
            raise exc.within(field.name) from None
        if sub.pos != sub.end:
            raise KafkaDecodeError(f"{sub.end - sub.pos} bytes left over", field.name)
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
