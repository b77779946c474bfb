"""The Kafka policy processor of one connection: bytes in, bytes out (sans-IO).

Theory of operation
-------------------
A `KafkaConnection` sits between one client and one broker. Whatever carries
the bytes (Envoy's network ext_proc stream, or an asyncio relay in the tests)
feeds it what the client sent (`receive_from_client`) and what the broker sent
(`receive_from_broker`), and forwards the `KafkaOutput` it gets back: bytes for
the broker, bytes for the client, access records, and possibly a `close` reason,
after which the carrier closes both sides and feeds nothing more.

Requests are cut into frames (a partial frame waits for the rest) and decoded
with `KafkaCodec`; each is judged by `flagella.policy.l7.l7_allows` on the
peer's `L7Policy`, with its client id and all its topics (names, and topic ids
resolved through `TopicIds`, learnt from Metadata answers).

Kafka answers strictly in request order and clients match answers by
correlation id, so a denial cannot simply drop a request or inject an answer:

* allowed: the frame goes to the broker unchanged; its answer passes through
  unchanged, streamed as it arrives (Fetch answers can be large);
* denied: the broker gets ApiVersions v0 with the same correlation id
  instead; when that answer arrives, the client gets the error response of the
  original type and version (29 TOPIC_AUTHORIZATION_FAILED, or the type's own
  authorization error) in its place;
* Produce with acks=0 has no answer: allowed, it is forwarded; denied, it is
  dropped, and nothing is awaited or forged;
* Metadata: the topics the peer may not see are taken out of the request, and
  the answer is filtered to the visible topics, with a
  TOPIC_AUTHORIZATION_FAILED entry for each refused topic it named. A request
  for all topics gets only the visible ones back;
* ApiVersions: the answer is capped to the versions the catalog knows, so
  clients only ever speak versions whose topics the processor can read. An
  ApiVersions request of a version the catalog does not know is answered (via
  the ApiVersions v0 substitute) with UNSUPPORTED_VERSION and that capped list,
  as an older broker would; clients then retry with a version both know;
* a request that cannot be decoded, an oversized frame, an answer that does
  not match the oldest outstanding request, or a denied request of a type the
  catalog does not know (no error response can be built) closes the connection.

`pending` holds one entry per request awaiting an answer, in order, with what
to do with that answer (the transition table `_ANSWER`).

Every byte of the connection passes through here, so the common case copies
nothing: frames are decoded in place (views into the read), a read made only of
allowed, unchanged frames is handed back as is, and so is a read that lies
inside an answer passing through. A frame split across reads is held as the
reads that brought it, joined once when whole; a produce's records decode as a
view of the frame.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Literal

from flagella.policy.l7 import KafkaRequest as PolicyRequest
from flagella.policy.l7 import kafka_topic_visible, l7_allows
from flagella.policy.mapstate import L7Policy
from flagella.proxy.kafka._protocol import (
    API_VERSIONS,
    FIND_COORDINATOR,
    METADATA,
    UNSUPPORTED_VERSION,
    KafkaCodec,
    KafkaRequest,
)
from flagella.proxy.kafka._wire import KafkaDecodeError, KafkaEncodeError, Struct

_SIZE: Final = struct.Struct(">i")
#: A read of a split frame at least this large is held as it came (a view); smaller ones are
#: gathered into one buffer, so a trickle of tiny reads cannot grow the list without bound.
_VIEW_BYTES: Final = 64 << 10

Verdict = Literal["forwarded", "denied"]
_Chunks = list[bytes | memoryview]


@dataclass(frozen=True)
class KafkaSettings:
    """Limits of the processor. Defaults follow the broker's own."""

    #: Largest request frame accepted (Kafka's ``socket.request.max.bytes``, 100 MiB).
    max_request_bytes: int = 100 * 1024 * 1024
    #: Largest answer frame the processor holds to rewrite (Metadata, denied requests).
    max_held_response_bytes: int = 100 * 1024 * 1024
    #: Where clients reach this proxy, when they do not reach it at the broker's own address
    #: (a relay on another port): Metadata answers then name this host and port for every
    #: broker. None (transparent redirection, as with the node-local Envoy) changes nothing.
    advertised_broker: tuple[str, int] | None = None


class TopicIds:
    """Topic id -> name, learnt from Metadata answers; shared by the connections to a broker."""

    def __init__(self) -> None:
        self._names: dict[bytes, str] = {}

    def learn(self, topic_id: bytes, name: str) -> None:
        if any(topic_id):
            self._names[topic_id] = name

    def name(self, topic_id: bytes) -> str | None:
        return self._names.get(topic_id)


@dataclass(frozen=True)
class KafkaAccessRecord:
    """One judged request, for the monitor and metrics."""

    identity: int
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    topics: tuple[str, ...]
    verdict: Verdict
    #: Topics refused inside an otherwise answered Metadata request.
    refused_topics: tuple[str, ...] = ()


@dataclass
class KafkaOutput:
    #: Bytes for each side: the very input (or a view of it) when it passes unchanged.
    to_broker: bytes | memoryview = b""
    to_client: bytes | memoryview = b""
    records: list[KafkaAccessRecord] = field(default_factory=list)
    #: Set when the connection must be closed (both sides), after sending the bytes above.
    close: str | None = None


class _Answer(Enum):
    PASS = "pass"  # forward the broker's answer unchanged
    REPLACE = "replace"  # swallow the answer to the substitute, send the forged error
    FILTER = "filter"  # decode the Metadata answer, filter it, re-encode
    VERSIONS = "versions"  # cap the ApiVersions answer to the catalog's versions
    ADVERTISE = "advertise"  # point FindCoordinator's answer at ``advertised_broker``


@dataclass(frozen=True)
class _Pending:
    correlation_id: int
    answer: _Answer
    api_version: int = 0
    forged: bytes = b""  # REPLACE: the error response
    error: int = 0  # VERSIONS: the error code to answer with
    all_topics: bool = False  # FILTER: the request asked for every topic
    asked: frozenset[str] = frozenset()  # FILTER: the visible topics it named
    refused: tuple[Struct, ...] = ()  # FILTER: request entries of refused topics
    policy_request: PolicyRequest | None = None


class KafkaConnection:
    """The processor of one client connection (see the module docstring)."""

    def __init__(
        self,
        identity: int,
        policy: L7Policy,
        *,
        codec: KafkaCodec,
        topic_ids: TopicIds | None = None,
        settings: KafkaSettings | None = None,
    ) -> None:
        self.identity = identity
        self.policy = policy
        self.codec = codec
        self.topic_ids = topic_ids if topic_ids is not None else TopicIds()
        self.settings = settings or KafkaSettings()
        self.pending: deque[_Pending] = deque()
        self.closed: str | None = None
        #: A frame split across reads: its reads so far (views, not copies), their size,
        #: and the size the frame needs (0: not known yet).
        self._held: list[bytes | bytearray | memoryview] = []
        self._held_size = 0
        self._held_need = 0
        self._responses = bytearray()
        self._passthrough = 0  # bytes of the current answer still to stream to the client

    def update_policy(self, policy: L7Policy) -> None:
        """New rules apply from the next request on."""
        self.policy = policy

    # -- client -> broker ------------------------------------------------------------

    def receive_from_client(self, data: bytes | memoryview) -> KafkaOutput:
        out = KafkaOutput()
        if self.closed is not None:
            out.close = self.closed
            return out
        if not isinstance(data, bytes | memoryview):
            data = bytes(data)  # a bytearray may change under us; bytes and views of them do not
        if self._held:
            # A frame split across reads: hold the reads (no copy) until it is complete, then
            # decode them joined like a fresh read: one copy per completed frame.
            if len(data) >= _VIEW_BYTES:
                self._held.append(data)
            elif isinstance(self._held[-1], bytearray):
                self._held[-1] += data  # small reads share one buffer: bounded list overhead
            else:
                self._held.append(bytearray(data))
            self._held_size += len(data)
            if not self._frame_ready():
                return out
            data = b"".join(self._held)
            self._held.clear()
            self._held_size = self._held_need = 0
        view = memoryview(data)
        total = len(data)
        pos = 0
        chunks: list[bytes | memoryview] = []  # what goes to the broker, in order
        unchanged = True  # every frame so far goes to the broker as it came
        while total - pos >= 4:
            size = _SIZE.unpack_from(data, pos)[0]
            if size < 0 or size > self.settings.max_request_bytes:
                self._close(out, f"request frame of {size} bytes (limit "
                                 f"{self.settings.max_request_bytes})")
                break
            end = pos + 4 + size
            if end > total:
                break
            frame = view[pos:end]
            pos = end
            before = len(chunks)
            try:
                request = self.codec.decode_request(frame[4:], frame=frame)
                self._judge(request, chunks, out)
            except (KafkaDecodeError, KafkaEncodeError) as exc:
                self._close(out, f"unparsable request: {exc}")
                break
            if out.close is not None:
                break
            unchanged = unchanged and len(chunks) == before + 1 and chunks[-1] is frame
        if out.close is None and pos < total:
            self._held.append(view[pos:])
            self._held_size = total - pos
        if out.close is None and unchanged:
            # The common case: allowed frames, passed on as they came, without a copy.
            out.to_broker = data if pos == total else view[:pos]
        else:
            out.to_broker = b"".join(chunks)
        return out

    def _frame_ready(self) -> bool:
        """Whether the held reads make a whole frame, or a size that closes the connection."""
        if not self._held_need:
            if self._held_size < 4:
                return False
            head = bytearray()
            for piece in self._held:  # the size may straddle reads; never copy more than it
                head += piece[: 4 - len(head)]
                if len(head) == 4:
                    break
            size: int = _SIZE.unpack_from(head, 0)[0]
            if size < 0 or size > self.settings.max_request_bytes:
                return True  # decoded at once: the size check closes the connection
            self._held_need = 4 + size
        return self._held_size >= self._held_need

    def _policy_request(self, request: KafkaRequest) -> PolicyRequest:
        topics = self.codec.request_topics(request)
        names = list(topics.names)
        resolved = True
        for topic_id in topics.ids:
            name = self.topic_ids.name(topic_id)
            if name is None:
                resolved = False
            else:
                names.append(name)
        known = request.known or (
            request.api_key in self.codec.catalog.requests
            and not self.codec.carries_topics(request.api_key)
        )
        return PolicyRequest(
            api_key=request.api_key,
            api_version=request.api_version,
            client_id=request.client_id or "",
            topics=tuple(dict.fromkeys(names)),
            topics_known=known and resolved,
        )

    def _judge(self, request: KafkaRequest, to_broker: _Chunks, out: KafkaOutput) -> None:
        query = self._policy_request(request)
        rewrite = not self.policy.wildcard or self.settings.advertised_broker is not None
        if request.api_key == METADATA and request.body is not None and rewrite:
            self._metadata(request, query, to_broker, out)
            return
        allowed = l7_allows(self.policy, query)
        out.records.append(self._record(request, query, "forwarded" if allowed else "denied"))
        expects_response = self.codec.expects_response(request)
        if allowed and request.api_key == API_VERSIONS:
            if request.known:
                to_broker.append(request.frame)
                self.pending.append(_Pending(
                    request.correlation_id, _Answer.VERSIONS, api_version=request.api_version
                ))
            else:
                to_broker.append(self.codec.substitute_request(request))
                self.pending.append(_Pending(
                    request.correlation_id, _Answer.VERSIONS, error=UNSUPPORTED_VERSION
                ))
            return
        if allowed:
            to_broker.append(request.frame)
            if not expects_response:
                return
            advertise = (
                request.api_key == FIND_COORDINATOR
                and self.settings.advertised_broker is not None
            )
            self.pending.append(_Pending(
                request.correlation_id, _Answer.ADVERTISE if advertise else _Answer.PASS,
                api_version=request.api_version,
            ))
            return
        if not expects_response:
            return  # acks=0: the client awaits nothing; the request just does not happen
        if not request.known:
            self._close(out, f"denied request of api key {request.api_key} "
                             f"v{request.api_version} has no known error response")
            return
        forged = self.codec.error_response(request)
        to_broker.append(self.codec.substitute_request(request))
        self.pending.append(_Pending(request.correlation_id, _Answer.REPLACE, forged=forged))

    def _metadata(
        self, request: KafkaRequest, query: PolicyRequest, to_broker: _Chunks, out: KafkaOutput
    ) -> None:
        assert request.body is not None
        base = PolicyRequest(query.api_key, query.api_version, query.client_id)
        if not l7_allows(self.policy, base):
            out.records.append(self._record(request, query, "denied"))
            to_broker.append(self.codec.substitute_request(request))
            self.pending.append(_Pending(
                request.correlation_id, _Answer.REPLACE, forged=self.codec.error_response(request)
            ))
            return
        entries: Sequence[Struct] | None = request.body.get("Topics")
        all_topics = entries is None or (request.api_version == 0 and not entries)
        keep: list[Struct] = []
        refused: list[Struct] = []
        asked: set[str] = set()
        for entry in entries or ():
            name = self._entry_name(entry)
            if name is not None and self._visible(base, name):
                keep.append(entry)
                asked.add(name)
            else:
                refused.append(entry)
        if refused:
            to_broker.append(self.codec.metadata_request(request, keep))
        else:
            to_broker.append(request.frame)
        refused_names = tuple(self._entry_label(e) for e in refused)
        out.records.append(self._record(request, query, "forwarded", refused_names))
        self.pending.append(_Pending(
            request.correlation_id, _Answer.FILTER, api_version=request.api_version,
            all_topics=all_topics, asked=frozenset(asked), refused=tuple(refused),
            policy_request=base,
        ))

    def _visible(self, request: PolicyRequest, topic: str) -> bool:
        return self.policy.wildcard or kafka_topic_visible(self.policy.kafka, request, topic)

    def _entry_name(self, entry: Mapping[str, Any]) -> str | None:
        name = entry.get("Name")
        if isinstance(name, str):
            return name
        topic_id = entry.get("TopicId")
        return self.topic_ids.name(topic_id) if isinstance(topic_id, bytes) else None

    def _entry_label(self, entry: Mapping[str, Any]) -> str:
        name = self._entry_name(entry)
        if name is not None:
            return name
        topic_id = entry.get("TopicId")
        return topic_id.hex() if isinstance(topic_id, bytes) else "?"

    def _record(
        self, request: KafkaRequest, query: PolicyRequest, verdict: Verdict,
        refused: tuple[str, ...] = (),
    ) -> KafkaAccessRecord:
        return KafkaAccessRecord(
            identity=self.identity, api_key=request.api_key, api_version=request.api_version,
            correlation_id=request.correlation_id, client_id=request.client_id,
            topics=query.topics, verdict=verdict, refused_topics=refused,
        )

    # -- broker -> client ------------------------------------------------------------

    def receive_from_broker(self, data: bytes | memoryview) -> KafkaOutput:
        out = KafkaOutput()
        if self.closed is not None:
            out.close = self.closed
            return out
        buf = self._responses
        if not buf and self._passthrough >= len(data):
            # Inside a large answer that passes unchanged (Fetch): hand the read on as is.
            self._passthrough -= len(data)
            out.to_client = data if isinstance(data, bytes | memoryview) else bytes(data)
            return out
        to_client = bytearray()
        if self._passthrough and not buf:
            n = min(self._passthrough, len(data))
            to_client += data[:n]
            self._passthrough -= n
            data = data[n:]
        buf += data
        while buf:
            if self._passthrough:
                n = min(self._passthrough, len(buf))
                to_client += buf[:n]
                del buf[:n]
                self._passthrough -= n
                continue
            if len(buf) < 8:
                break
            size, correlation_id = struct.unpack_from(">ii", buf, 0)
            if size < 4:
                self._close(out, f"answer frame of {size} bytes")
                break
            if not self.pending:
                self._close(out, f"answer {correlation_id} to no outstanding request")
                break
            head = self.pending[0]
            if head.correlation_id != correlation_id:
                self._close(out, f"answer {correlation_id} out of order "
                                 f"(awaiting {head.correlation_id})")
                break
            if head.answer is _Answer.PASS:
                self.pending.popleft()
                self._passthrough = 4 + size
                continue
            if size > self.settings.max_held_response_bytes:
                self._close(out, f"answer frame of {size} bytes is too large to rewrite")
                break
            if len(buf) < 4 + size:
                break
            payload = bytes(buf[4 : 4 + size])
            del buf[: 4 + size]
            self.pending.popleft()
            try:
                to_client += _ANSWER[head.answer](self, head, payload)
            except (KafkaDecodeError, KafkaEncodeError) as exc:
                self._close(out, f"unparsable answer: {exc}")
                break
        out.to_client = bytes(to_client)
        return out

    def _replace(self, head: _Pending, payload: bytes) -> bytes:
        return head.forged

    def _filter(self, head: _Pending, payload: bytes) -> bytes:
        correlation_id, body = self.codec.decode_response(METADATA, head.api_version, payload)
        visible: list[Struct] = []
        for entry in body.get("Topics") or ():
            name = entry.get("Name")
            topic_id = entry.get("TopicId")
            if isinstance(name, str) and isinstance(topic_id, bytes):
                self.topic_ids.learn(topic_id, name)
            name = self._entry_name(entry)
            if name is None or (not head.all_topics and name not in head.asked):
                continue
            assert head.policy_request is not None
            if self._visible(head.policy_request, name):
                visible.append(entry)
        visible.extend(
            self.codec.metadata_denied_entry(head.api_version, e) for e in head.refused
        )
        body["Topics"] = visible
        self._point_at_proxy(body.get("Brokers") or ())
        return self.codec.encode_response(METADATA, head.api_version, correlation_id, body)

    def _versions(self, head: _Pending, payload: bytes) -> bytes:
        correlation_id, body = self.codec.decode_response(API_VERSIONS, head.api_version, payload)
        known = self.codec.catalog.requests
        capped = []
        for entry in body.get("ApiKeys") or ():
            spec = known.get(entry["ApiKey"])
            if spec is None or entry["MinVersion"] > spec.max_version:
                continue
            capped.append(entry | {"MaxVersion": min(entry["MaxVersion"], spec.max_version)})
        body["ApiKeys"] = capped
        if head.error:
            body["ErrorCode"] = head.error
        return self.codec.encode_response(API_VERSIONS, head.api_version, correlation_id, body)

    def _advertise(self, head: _Pending, payload: bytes) -> bytes:
        correlation_id, body = self.codec.decode_response(
            FIND_COORDINATOR, head.api_version, payload
        )
        self._point_at_proxy([body])
        self._point_at_proxy(body.get("Coordinators") or ())
        return self.codec.encode_response(
            FIND_COORDINATOR, head.api_version, correlation_id, body
        )

    def _point_at_proxy(self, entries: Sequence[Struct]) -> None:
        if self.settings.advertised_broker is None:
            return
        host, port = self.settings.advertised_broker
        for entry in entries:
            if "Host" in entry and "Port" in entry:
                entry["Host"], entry["Port"] = host, port

    def _close(self, out: KafkaOutput, reason: str) -> None:
        self.closed = reason
        out.close = reason


#: What to do with the broker's answer to each kind of outstanding request.
_ANSWER: Final[dict[_Answer, Callable[[KafkaConnection, _Pending, bytes], bytes]]] = {
    _Answer.REPLACE: KafkaConnection._replace,
    _Answer.FILTER: KafkaConnection._filter,
    _Answer.VERSIONS: KafkaConnection._versions,
    _Answer.ADVERTISE: KafkaConnection._advertise,
}
