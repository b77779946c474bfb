"""Kafka frames: requests and responses of every API, their topics, and forged replies.

Theory of operation
-------------------
A frame is an int32 size and that many bytes. A request frame starts with the
request header (api key, version, correlation id, client id; header v2, used by
flexible versions, adds a tagged-field section); a response frame starts with
the correlation id (plus tagged fields in flexible versions, except for
ApiVersions, whose response header is always v0 so that a client can read it
before it knows what the broker speaks).

`KafkaCodec` decodes and encodes any request or response of a `Catalog`, and
builds the three things the policy processor forges:

* `error_response`: the response of the request's own type and version, every
  ``*ErrorCode`` field set to the denial code, topic and partition entries
  mirrored from the request (so a client sees an error for each partition it
  asked about). Arrays are paired by role, not by name, because Kafka names
  them differently on each side (``TopicData``/``Responses``,
  ``Index``/``Index``, ``Partition``/``PartitionIndex``).
* `substitute_request`: ApiVersions v0 with the same correlation id and client
  id, which every broker answers harmlessly, to keep the broker's answers in
  request order while the denied request never reaches it.
* Metadata rewriting (`metadata_request` / `metadata_response`) for the
  per-topic answers of a partly allowed Metadata request.

Topics come from the definitions, not from a list kept here: a request's topics
are the values of every field whose ``entityType`` is ``topicName``, and its
topic ids the ``TopicId`` uuids (Fetch v13+, Metadata v10+ and others name
topics by id; the caller resolves them).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from flagella.proxy.kafka._schema import Catalog, FieldSpec, MessageSpec, default_catalog
from flagella.proxy.kafka._wire import (
    KafkaDecodeError,
    Reader,
    Struct,
    decode_struct,
    encode_struct,
)

API_VERSIONS: Final = 18
METADATA: Final = 3
PRODUCE: Final = 0
CONTROLLED_SHUTDOWN: Final = 7
FIND_COORDINATOR: Final = 10

UNSUPPORTED_VERSION: Final = 35

TOPIC_AUTHORIZATION_FAILED: Final = 29
GROUP_AUTHORIZATION_FAILED: Final = 30
CLUSTER_AUTHORIZATION_FAILED: Final = 31
TRANSACTIONAL_ID_AUTHORIZATION_FAILED: Final = 53
DELEGATION_TOKEN_AUTHORIZATION_FAILED: Final = 65

#: The authorization error of request types that carry no topic (the rest: 31).
_OWN_AUTHORIZATION_ERROR: Final[Mapping[int, int]] = {
    **dict.fromkeys((10, 11, 12, 13, 14, 15, 42, 69), GROUP_AUTHORIZATION_FAILED),
    **dict.fromkeys((22, 25, 26, 65), TRANSACTIONAL_ID_AUTHORIZATION_FAILED),
    **dict.fromkeys((38, 39, 40, 41), DELEGATION_TOKEN_AUTHORIZATION_FAILED),
}

_SIZE: Final = struct.Struct(">i")
_HEAD: Final = struct.Struct(">hhi")
_PARTITION_NAMES: Final = frozenset({"Partition", "PartitionIndex", "Index", "PartitionId"})


#: A request type and version's spec (None: unknown), header version, header and body flexibility.
_Layout = tuple[MessageSpec | None, int, bool, bool]


@dataclass(frozen=True)
class KafkaRequest:
    """One decoded request frame. ``body`` is None for a type or version the catalog lacks."""

    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    body: Struct | None
    #: The whole frame, size prefix included (a view into the bytes it was decoded from,
    #: when the caller passed it).
    frame: bytes | memoryview

    @property
    def known(self) -> bool:
        return self.body is not None


@dataclass(frozen=True)
class RequestTopics:
    names: tuple[str, ...]
    ids: tuple[bytes, ...]


def framed(payload: bytes | bytearray) -> bytes:
    return _SIZE.pack(len(payload)) + payload


def _role(field: FieldSpec) -> str:
    """What a field stands for, to pair request and response fields named differently."""
    if field.entity == "topicName" and field.element == "string":
        return "topics" if field.is_array else "topic"
    if field.name == "TopicId" and field.type == "uuid":
        return "topic-id"
    if field.element == "int32" and (
        field.name in _PARTITION_NAMES or (field.is_array and field.name.startswith("Partition"))
    ):
        return "partitions" if field.is_array else "partition"
    if field.is_array and field.fields is not None:
        children = {_role(f) for f in field.fields}
        if "topic" in children or "topic-id" in children:
            return "topics"
        if "partition" in children:
            return "partitions"
        # Entries keyed by the same field (TransactionalId, GroupId, ...) answer each other.
        return f"[{field.fields[0].name}]" if field.fields else f"={field.name}"
    return f"={field.name}:{field.type}"


def _element_role(array_role: str) -> str:
    return array_role[:-1] if array_role in ("topics", "partitions") else array_role


class KafkaCodec:
    """Decode and encode every request and response the catalog defines."""

    def __init__(self, catalog: Catalog | None = None) -> None:
        self.catalog = catalog or default_catalog()
        self._request_layouts: dict[tuple[int, int], _Layout] = {}
        self._topic_bearing = frozenset(
            key for key, spec in self.catalog.requests.items() if _carries_topics(spec.fields)
        )

    # -- classification ------------------------------------------------------------

    def request_spec(self, api_key: int, api_version: int) -> MessageSpec | None:
        spec = self.catalog.requests.get(api_key)
        return spec if spec is not None and api_version in spec.valid else None

    def carries_topics(self, api_key: int) -> bool:
        """Whether some version of this request type names topics."""
        return api_key in self._topic_bearing

    def authorization_error(self, api_key: int) -> int:
        """The error code a denial of this request type answers with."""
        if api_key in self._topic_bearing:
            return TOPIC_AUTHORIZATION_FAILED
        return _OWN_AUTHORIZATION_ERROR.get(api_key, CLUSTER_AUTHORIZATION_FAILED)

    def expects_response(self, request: KafkaRequest) -> bool:
        """Produce with acks=0 is the one request the broker does not answer."""
        return not (
            request.api_key == PRODUCE and request.body is not None and request.body["Acks"] == 0
        )

    def _request_header_version(self, spec: MessageSpec, api_version: int) -> int:
        if spec.api_key == CONTROLLED_SHUTDOWN and api_version == 0:
            return 0
        return 2 if api_version in spec.flexible else 1

    def _response_flexible_header(self, api_key: int, api_version: int) -> bool:
        spec = self.catalog.responses[api_key]
        return api_key != API_VERSIONS and api_version in spec.flexible

    # -- requests ------------------------------------------------------------------

    def decode_request(
        self, payload: bytes | memoryview, *, frame: bytes | memoryview | None = None
    ) -> KafkaRequest:
        """Decode a request frame's payload (the bytes after the size). A caller that holds
        the whole frame (size included) passes it as ``frame``, so it is not copied."""
        r = Reader(payload)
        if r.remaining < _HEAD.size:
            raise KafkaDecodeError("request shorter than its header")
        api_key, api_version, correlation_id = _HEAD.unpack_from(payload, 0)
        layout = self._request_layouts.get((api_key, api_version))
        if layout is None:
            layout = self._request_layout(api_key, api_version)
        spec, hv, header_flexible, body_flexible = layout
        header_spec = self.catalog.request_header
        if spec is None:
            # Unknown type or version: header v1's client id still follows, and is all we read.
            header = decode_struct(header_spec.fields, 1, False, r)
            body = None
        else:
            header = decode_struct(header_spec.fields, hv, header_flexible, r)
            try:
                body = decode_struct(spec.fields, api_version, body_flexible, r)
            except KafkaDecodeError as exc:
                raise exc.within(f"{spec.name} v{api_version}") from None
            # Bytes after the body are ignored, as the broker ignores them (librdkafka's
            # admin client sends Metadata v12 with three): judged and broker read alike.
        return KafkaRequest(
            api_key=api_key,
            api_version=api_version,
            correlation_id=correlation_id,
            client_id=header.get("ClientId"),
            body=body,
            frame=frame if frame is not None else framed(bytes(payload)),
        )

    def _request_layout(self, api_key: int, api_version: int) -> _Layout:
        """The spec, header version and flexibility of a request type and version, cached."""
        spec = self.request_spec(api_key, api_version)
        if spec is None:
            layout: _Layout = (None, 1, False, False)
        else:
            hv = self._request_header_version(spec, api_version)
            layout = (spec, hv, hv in self.catalog.request_header.flexible,
                      api_version in spec.flexible)
        if len(self._request_layouts) < 4096:  # bounded: versions come from the wire
            self._request_layouts[(api_key, api_version)] = layout
        return layout

    def encode_request(
        self, api_key: int, api_version: int, correlation_id: int, client_id: str | None,
        body: Mapping[str, Any],
    ) -> bytes:
        spec = self.catalog.requests[api_key]
        header_spec = self.catalog.request_header
        hv = self._request_header_version(spec, api_version)
        out = bytearray()
        header = {"RequestApiKey": api_key, "RequestApiVersion": api_version,
                  "CorrelationId": correlation_id, "ClientId": client_id}
        encode_struct(header_spec.fields, hv, hv in header_spec.flexible, header, out)
        encode_struct(spec.fields, api_version, api_version in spec.flexible, body, out)
        return framed(out)

    def request_topics(self, request: KafkaRequest) -> RequestTopics:
        spec = self.request_spec(request.api_key, request.api_version)
        if spec is None or request.body is None:
            return RequestTopics((), ())
        names: list[str] = []
        ids: list[bytes] = []
        _collect_topics(spec.fields, request.body, names, ids)
        return RequestTopics(tuple(dict.fromkeys(names)), tuple(dict.fromkeys(ids)))

    def substitute_request(self, request: KafkaRequest) -> bytes:
        """The harmless request sent in a denied one's place: ApiVersions v0, same ids."""
        return self.encode_request(API_VERSIONS, 0, request.correlation_id, request.client_id, {})

    # -- responses -----------------------------------------------------------------

    def response_correlation_id(self, payload: bytes | memoryview) -> int:
        if len(payload) < 4:
            raise KafkaDecodeError("response shorter than its correlation id")
        value: int = _SIZE.unpack_from(payload, 0)[0]
        return value

    def decode_response(
        self, api_key: int, api_version: int, payload: bytes | memoryview
    ) -> tuple[int, Struct]:
        spec = self.catalog.responses[api_key]
        r = Reader(payload)
        header_flexible = self._response_flexible_header(api_key, api_version)
        header = decode_struct(
            self.catalog.response_header.fields, int(header_flexible), header_flexible, r
        )
        try:
            body = decode_struct(spec.fields, api_version, api_version in spec.flexible, r)
        except KafkaDecodeError as exc:
            raise exc.within(f"{spec.name} v{api_version}") from None
        if r.remaining:
            raise KafkaDecodeError(
                f"{r.remaining} bytes after the body", f"{spec.name} v{api_version}"
            )
        return int(header["CorrelationId"]), body

    def encode_response(
        self, api_key: int, api_version: int, correlation_id: int, body: Mapping[str, Any]
    ) -> bytes:
        spec = self.catalog.responses[api_key]
        header_flexible = self._response_flexible_header(api_key, api_version)
        out = bytearray()
        encode_struct(
            self.catalog.response_header.fields, int(header_flexible), header_flexible,
            {"CorrelationId": correlation_id}, out,
        )
        encode_struct(spec.fields, api_version, api_version in spec.flexible, body, out)
        return framed(out)

    def error_response(self, request: KafkaRequest, code: int | None = None) -> bytes:
        """The response of ``request``'s type and version that refuses it with ``code``."""
        spec = self.request_spec(request.api_key, request.api_version)
        if spec is None or request.body is None:
            raise KafkaDecodeError(
                f"no error response for api key {request.api_key} v{request.api_version}"
            )
        if code is None:
            code = self.authorization_error(request.api_key)
        response = self.catalog.responses[request.api_key]
        body = _mirror(response.fields, spec.fields, request.body, request.api_version, code)
        return self.encode_response(
            request.api_key, request.api_version, request.correlation_id, body
        )

    # -- Metadata ------------------------------------------------------------------

    def metadata_request(self, request: KafkaRequest, keep: Sequence[Struct]) -> bytes:
        """``request`` asking only for the topic entries ``keep``."""
        assert request.body is not None and request.api_key == METADATA
        body = dict(request.body)
        body["Topics"] = list(keep)
        return self.encode_request(
            METADATA, request.api_version, request.correlation_id, request.client_id, body
        )

    def metadata_denied_entry(self, api_version: int, topic: Struct) -> Struct:
        """A Metadata response topic entry refusing ``topic`` (a request entry)."""
        spec = self.catalog.responses[METADATA]
        topics = next(f for f in spec.fields if f.name == "Topics")
        assert topics.fields is not None
        request_topics = next(f for f in self.catalog.requests[METADATA].fields if f.name == "Topics")
        assert request_topics.fields is not None
        return _mirror(
            topics.fields, request_topics.fields, topic, api_version, TOPIC_AUTHORIZATION_FAILED
        )


def _carries_topics(fields: Sequence[FieldSpec]) -> bool:
    for field in fields:
        if field.entity == "topicName" or (field.name == "TopicId" and field.type == "uuid"):
            return True
        if field.fields is not None and _carries_topics(field.fields):
            return True
    return False


_NAME, _ID, _NESTED = range(3)
#: id(fields) -> (fields, the fields that are or hold topics: name, kind, children, array).
_TOPIC_FIELDS: dict[
    int, tuple[Sequence[FieldSpec], tuple[tuple[str, int, Sequence[FieldSpec], bool], ...]]
] = {}


def _topic_fields(
    fields: Sequence[FieldSpec],
) -> tuple[tuple[str, int, Sequence[FieldSpec], bool], ...]:
    hit = _TOPIC_FIELDS.get(id(fields))
    if hit is not None and hit[0] is fields:
        return hit[1]
    out: list[tuple[str, int, Sequence[FieldSpec], bool]] = []
    for field in fields:
        if field.entity == "topicName":
            out.append((field.name, _NAME, (), field.is_array))
        elif field.name == "TopicId":
            out.append((field.name, _ID, (), field.is_array))
        elif field.fields is not None and _carries_topics(field.fields):
            out.append((field.name, _NESTED, field.fields, field.is_array))
    _TOPIC_FIELDS[id(fields)] = (fields, tuple(out))
    return tuple(out)


def _collect_topics(
    fields: Sequence[FieldSpec], value: Mapping[str, Any], names: list[str], ids: list[bytes]
) -> None:
    """Append the topic names and non-zero topic ids of a decoded struct, depth first,
    visiting only the fields that are or hold topics."""
    for name, kind, children, is_array in _topic_fields(fields):
        if name not in value:
            continue
        item = value[name]
        if kind == _NAME:
            if isinstance(item, list):
                names.extend(v for v in item if isinstance(v, str))
            elif isinstance(item, str):
                names.append(item)
        elif kind == _ID:
            if isinstance(item, bytes) and any(item):
                ids.append(item)
        elif item is not None:
            for element in item if is_array else (item,):
                _collect_topics(children, element, names, ids)


def _is_error_code(field: FieldSpec) -> bool:
    return field.type == "int16" and field.name.endswith("ErrorCode")


def _mirror(
    response_fields: Sequence[FieldSpec], request_fields: Sequence[FieldSpec],
    request: Mapping[str, Any], version: int, code: int,
) -> Struct:
    """A response struct answering ``request``: error codes set, entries paired by role."""
    by_role: dict[str, FieldSpec] = {}
    by_name: dict[str, FieldSpec] = {}
    for field in request_fields:
        if version in field.versions and field.name in request:
            by_role.setdefault(_role(field), field)
            by_name[field.name] = field
    out: Struct = {}
    for field in response_fields:
        if version not in field.versions or version in field.tagged:
            continue
        if _is_error_code(field):
            out[field.name] = code
            continue
        source = by_role.get(_role(field)) or by_name.get(field.name)
        if source is None:
            continue
        value = request[source.name]
        if value is None:
            continue
        if field.fields is not None and field.is_array:
            if source.fields is not None:
                out[field.name] = [
                    _mirror(field.fields, source.fields, item, version, code) for item in value
                ]
            else:
                element = _element_role(_role(source))
                out[field.name] = [
                    _mirror(field.fields, (), {}, version, code) | _set_role(field.fields, element, item, version)
                    for item in value
                ]
        elif field.fields is None and source.fields is None and field.type == source.type:
            out[field.name] = value
    return out


def _set_role(fields: Sequence[FieldSpec], role: str, value: Any, version: int) -> Struct:
    for field in fields:
        if version in field.versions and _role(field) == role:
            kind = "uuid" if isinstance(value, bytes) else "string" if isinstance(value, str) else "int32"
            if field.type == kind:
                return {field.name: value}
    return {}
