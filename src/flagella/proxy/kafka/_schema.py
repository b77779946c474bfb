"""Kafka message definitions, loaded from Apache Kafka's own JSON files.

Theory of operation
-------------------
Kafka describes every request, response and header in a JSON file
(``clients/src/main/resources/common/message/*.json``, with ``//`` comment
lines). Each field has a type (``int8`` .. ``int64``, ``uint16``, ``float64``,
``bool``, ``uuid``, ``string``, ``bytes``, ``records``, ``[]T`` or a struct), the
versions it exists in, the versions it may be null in, and, in *flexible*
versions (KIP-482), whether it is a tagged field. This module turns those files
into immutable `MessageSpec` / `FieldSpec` trees; `flagella.proxy.kafka._wire`
interprets the trees, so no version of any message is written by hand.

The package ships the definitions as one JSON document (``messages.json``,
comments and ``about`` texts dropped) made by ``scripts/gen_kafka_messages.py``
from the definitions directory; a test checks it still equals what the
directory gives.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final

from flagella.errors import FlagellaError


class KafkaSchemaError(FlagellaError):
    """A Kafka message definition is malformed."""


@dataclass(frozen=True)
class Versions:
    """An inclusive version range; ``hi`` None means open-ended, lo > hi means none."""

    lo: int
    hi: int | None

    @classmethod
    def parse(cls, text: str | None) -> Versions:
        if text is None or text == "none":
            return NO_VERSIONS
        text = text.strip()
        if text.endswith("+"):
            return cls(int(text[:-1]), None)
        lo, sep, hi = text.partition("-")
        return cls(int(lo), int(hi) if sep else int(lo))

    def __contains__(self, version: object) -> bool:
        return isinstance(version, int) and self.lo <= version and (
            self.hi is None or version <= self.hi
        )


NO_VERSIONS: Final = Versions(0, -1)

PRIMITIVES: Final = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint16", "uint32", "float64", "uuid",
     "string", "bytes", "records"}
)


@dataclass(frozen=True)
class FieldSpec:
    """One field of a message or struct. ``fields`` is set for structs and struct arrays."""

    name: str
    type: str
    versions: Versions
    nullable: Versions = NO_VERSIONS
    tagged: Versions = NO_VERSIONS
    tag: int | None = None
    #: A field-level override of the message's flexible versions (the header's ClientId).
    flexible: Versions | None = None
    entity: str | None = None
    default: str | None = None
    fields: tuple[FieldSpec, ...] | None = None

    @property
    def is_array(self) -> bool:
        return self.type.startswith("[]")

    @property
    def element(self) -> str:
        """The element type of an array, the type itself otherwise."""
        return self.type[2:] if self.is_array else self.type

    @property
    def is_struct(self) -> bool:
        return self.fields is not None


@dataclass(frozen=True)
class MessageSpec:
    name: str
    kind: str  # "request" | "response" | "header"
    api_key: int | None
    valid: Versions
    flexible: Versions
    fields: tuple[FieldSpec, ...]

    @property
    def max_version(self) -> int:
        assert self.valid.hi is not None
        return self.valid.hi


@dataclass(frozen=True)
class Catalog:
    """Every request and response by api key, and the two headers."""

    requests: Mapping[int, MessageSpec]
    responses: Mapping[int, MessageSpec]
    request_header: MessageSpec
    response_header: MessageSpec


def strip_comments(text: str) -> str:
    """Kafka's definition files carry whole-line ``//`` comments; JSON does not allow them."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))


def _field(raw: Mapping[str, Any], structs: Mapping[str, Any], where: str) -> FieldSpec:
    try:
        name = str(raw["name"])
        type_ = str(raw["type"])
        versions = Versions.parse(raw["versions"])
    except (KeyError, ValueError) as exc:
        raise KafkaSchemaError(f"{where}: field needs name, type and versions ({exc})") from None
    path = f"{where}.{name}"
    element = type_[2:] if type_.startswith("[]") else type_
    fields: tuple[FieldSpec, ...] | None = None
    if element not in PRIMITIVES:
        body = raw.get("fields")
        if body is None:
            body = structs.get(element)
        if body is None:
            raise KafkaSchemaError(f"{path}: unknown type {type_!r}")
        fields = tuple(_field(f, structs, path) for f in body)
    tag = raw.get("tag")
    return FieldSpec(
        name=name,
        type=type_,
        versions=versions,
        nullable=Versions.parse(raw.get("nullableVersions")),
        tagged=Versions.parse(raw.get("taggedVersions")),
        tag=int(tag) if tag is not None else None,
        flexible=Versions.parse(raw["flexibleVersions"]) if "flexibleVersions" in raw else None,
        entity=raw.get("entityType"),
        default=str(raw["default"]) if "default" in raw else None,
        fields=fields,
    )


def message_from_definition(raw: Mapping[str, Any]) -> MessageSpec:
    name = str(raw.get("name", "?"))
    structs = {str(s["name"]): s["fields"] for s in raw.get("commonStructs", ())}
    return MessageSpec(
        name=name,
        kind=str(raw["type"]),
        api_key=int(raw["apiKey"]) if "apiKey" in raw else None,
        valid=Versions.parse(raw["validVersions"]),
        flexible=Versions.parse(raw.get("flexibleVersions")),
        fields=tuple(_field(f, structs, name) for f in raw["fields"]),
    )


def compact_definitions(texts: Iterable[str]) -> list[dict[str, Any]]:
    """Definitions as plain JSON values, comments and ``about`` texts dropped, by name."""

    def drop_about(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: drop_about(v) for k, v in value.items() if k != "about"}
        if isinstance(value, list):
            return [drop_about(v) for v in value]
        return value

    defs = [drop_about(json.loads(strip_comments(t))) for t in texts]
    return sorted(defs, key=lambda d: str(d.get("name")))


def catalog_from_definitions(defs: Iterable[Mapping[str, Any]]) -> Catalog:
    requests: dict[int, MessageSpec] = {}
    responses: dict[int, MessageSpec] = {}
    headers: dict[str, MessageSpec] = {}
    for raw in defs:
        spec = message_from_definition(raw)
        if spec.kind == "request" and spec.api_key is not None:
            requests[spec.api_key] = spec
        elif spec.kind == "response" and spec.api_key is not None:
            responses[spec.api_key] = spec
        elif spec.kind == "header":
            headers[spec.name] = spec
    try:
        return Catalog(requests, responses, headers["RequestHeader"], headers["ResponseHeader"])
    except KeyError as exc:
        raise KafkaSchemaError(f"missing header definition {exc}") from None


@cache
def default_catalog() -> Catalog:
    """The catalog shipped with the package (``messages.json``)."""
    text = resources.files(__package__).joinpath("messages.json").read_text("utf-8")
    return catalog_from_definitions(json.loads(text))
