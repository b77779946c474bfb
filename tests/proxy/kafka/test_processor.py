"""The per-connection processor, driven with real frames (no sockets)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagella.policy.api import KafkaRule
from flagella.policy.mapstate import L7Policy
from flagella.proxy.kafka import KafkaCodec, KafkaConnection, KafkaSettings, TopicIds
from flagella.proxy.kafka._protocol import _role
from tests.proxy.kafka import strategies

CODEC = KafkaCodec()
PRODUCE_KEYS = frozenset({0, 3, 18})
CONSUME_KEYS = frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18})


def policy(*rules: KafkaRule) -> L7Policy:
    return L7Policy("kafka", kafka=frozenset(rules))


HQ = policy(KafkaRule(PRODUCE_KEYS, topic="empire-announce"),
            KafkaRule(PRODUCE_KEYS, topic="deathstar-plans"))
OUTPOST = policy(KafkaRule(CONSUME_KEYS, topic="empire-announce"))


def connection(pol: L7Policy = HQ, **kw) -> KafkaConnection:  # type: ignore[no-untyped-def]
    return KafkaConnection(7, pol, codec=CODEC, **kw)


def produce(corr: int, *topics: str, acks: int = 1, version: int = 9, client: str = "c") -> bytes:
    body = {"Acks": acks, "TimeoutMs": 1000, "TopicData": [
        {"Name": t, "PartitionData": [{"Index": 0, "Records": b"r"}, {"Index": 3, "Records": b"s"}]}
        for t in topics
    ]}
    return CODEC.encode_request(0, version, corr, client, body)


def produce_answer(corr: int, version: int = 9) -> bytes:
    return CODEC.encode_response(0, version, corr, {"Responses": []})


def versions_v0_answer(corr: int) -> bytes:
    return CODEC.encode_response(18, 0, corr, {"ErrorCode": 0, "ApiKeys": [
        {"ApiKey": 0, "MinVersion": 0, "MaxVersion": 99}, {"ApiKey": 1000, "MinVersion": 0, "MaxVersion": 1}]})


def feed(conn: KafkaConnection, wire: bytes, cuts: list[int]) -> bytes:
    """``wire`` from the client in reads of the sizes ``cuts`` (cycled): what reaches the broker."""
    upstream = bytearray()
    pos = 0
    for cut in itertools.cycle(cuts):
        if pos >= len(wire):
            break
        upstream += conn.receive_from_client(wire[pos : pos + cut]).to_broker
        pos += cut
    return bytes(upstream)


def test_frames_split_across_reads_are_held_until_whole() -> None:
    conn = connection()
    frame = produce(1, "empire-announce")
    outs = [conn.receive_from_client(frame[i : i + 1]) for i in range(len(frame))]
    assert all(o.to_broker == b"" for o in outs[:-1])
    assert outs[-1].to_broker == frame
    assert [r.verdict for o in outs for r in o.records] == ["forwarded"]


def test_allowed_frames_pass_on_as_the_bytes_that_came() -> None:
    """A read of whole allowed frames is handed back as is (no copy); a trailing partial
    frame is held back, and the completed frame then goes out whole."""
    conn = connection()
    first, second, third = (produce(i, "empire-announce") for i in (1, 2, 3))
    read = first + second
    assert conn.receive_from_client(read).to_broker is read
    out = conn.receive_from_client(third + second[:5])
    assert out.to_broker == third
    assert conn.receive_from_client(second[5:]).to_broker == second
    assert [c.correlation_id for c in conn.pending] == [1, 2, 3, 2]


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["allowed", "denied"]), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 200), min_size=1, max_size=5),
)
def test_allowed_frames_reach_the_broker_unchanged_in_any_chunking(kinds, cuts) -> None:  # type: ignore[no-untyped-def]
    conn = connection()
    frames = [produce(i, "empire-announce" if kind == "allowed" else "secret")
              for i, kind in enumerate(kinds)]
    upstream = feed(conn, b"".join(frames), cuts)
    expected = [f if kind == "allowed" else CODEC.substitute_request(CODEC.decode_request(f[4:]))
                for f, kind in zip(frames, kinds, strict=True)]
    assert upstream == b"".join(expected)


def big_produce(corr: int, records: int) -> bytes:
    body = {"Acks": 1, "TimeoutMs": 1000, "TopicData": [{"Name": "empire-announce", "PartitionData": [
        {"Index": 0, "Records": bytes(range(256)) * (records // 256)}]}]}
    return CODEC.encode_request(0, 9, corr, "c", body)


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.sampled_from([1, 3, 4, 5, 4096, (64 << 10) - 1, 64 << 10, 100_000]),
                     min_size=1, max_size=8))
def test_large_frames_split_into_small_and_large_reads_pass_whole(cuts) -> None:  # type: ignore[no-untyped-def]
    """Split frames are held as views (large reads) and one shared buffer (small reads):
    whatever the mix, each frame reaches the broker whole and unchanged, in order."""
    conn = connection()
    frames = [big_produce(1, 150_000), produce(2, "empire-announce"), big_produce(3, 70_000)]
    wire = b"".join(frames)
    assert feed(conn, wire, cuts) == wire
    assert [r.correlation_id for r in conn.pending] == [1, 2, 3]


def test_a_trickled_frame_is_held_in_bounded_pieces() -> None:
    """An attacker sending a large frame a byte at a time costs one buffer, not one
    object per read."""
    conn = connection()
    frame = big_produce(1, 100_000)
    for i in range(len(frame) - 1):
        assert conn.receive_from_client(frame[i : i + 1]).to_broker == b""
    assert len(conn._held) <= 2
    assert conn.receive_from_client(frame[-1:]).to_broker == frame


def test_records_decode_as_a_view_of_the_frame() -> None:
    """A produce batch's records are not copied out of the frame they came in."""
    frame = big_produce(1, 4096)
    request = CODEC.decode_request(memoryview(frame)[4:], frame=memoryview(frame))
    records = request.body["TopicData"][0]["PartitionData"][0]["Records"]
    assert isinstance(records, memoryview) and records.readonly
    assert records.obj is frame and records == bytes(range(256)) * 16


def test_denial_keeps_answer_order() -> None:
    conn = connection(OUTPOST)
    allowed_1 = CODEC.encode_request(18, 3, 1, "c", {"ClientSoftwareName": "x", "ClientSoftwareVersion": "1"})
    denied = produce(2, "empire-announce")
    allowed_3 = CODEC.encode_request(12, 4, 3, "c", {"GroupId": "g", "GenerationId": 1, "MemberId": "m"})
    out = conn.receive_from_client(allowed_1 + denied + allowed_3)
    substitute = CODEC.encode_request(18, 0, 2, "c", {})
    assert out.to_broker == allowed_1 + substitute + allowed_3
    assert [r.verdict for r in out.records] == ["forwarded", "denied", "forwarded"]

    answer_1 = CODEC.encode_response(18, 3, 1, {"ErrorCode": 0, "ApiKeys": []})
    answer_3 = CODEC.encode_response(12, 4, 3, {"ErrorCode": 0})
    back = conn.receive_from_broker(answer_1 + versions_v0_answer(2) + answer_3)
    assert back.close is None
    frames = split(back.to_client)
    assert frames[0] == answer_1 and frames[2] == answer_3
    corr, body = CODEC.decode_response(0, 9, frames[1][4:])
    assert corr == 2
    assert [(t["Name"], [(p["Index"], p["ErrorCode"]) for p in t["PartitionResponses"]])
            for t in body["Responses"]] == [("empire-announce", [(0, 29), (3, 29)])]


def split(data: bytes) -> list[bytes]:
    out = []
    while data:
        (size,) = struct.unpack_from(">i", data)
        out.append(data[: 4 + size])
        data = data[4 + size :]
    return out


def test_acks_zero_produce_awaits_and_forges_nothing() -> None:
    conn = connection(OUTPOST)
    out = conn.receive_from_client(produce(5, "empire-announce", acks=0))
    assert (out.to_broker, out.to_client, [r.verdict for r in out.records]) == (b"", b"", ["denied"])
    assert not conn.pending
    hq = connection(HQ)
    frame = produce(6, "empire-announce", acks=0)
    assert hq.receive_from_client(frame).to_broker == frame
    assert not hq.pending


def test_every_topic_of_a_request_must_be_allowed() -> None:
    conn = connection(HQ)
    out = conn.receive_from_client(produce(1, "empire-announce", "empire-terminal-logs"))
    assert [r.verdict for r in out.records] == ["denied"]
    assert out.to_broker == CODEC.encode_request(18, 0, 1, "c", {})


def metadata_answer(corr: int, version: int, *names: str) -> bytes:
    return CODEC.encode_response(3, version, corr, {
        "Brokers": [{"NodeId": 1, "Host": "broker", "Port": 9092, "Rack": None}],
        "Topics": [{"ErrorCode": 0, "Name": n, "TopicId": bytes([i + 1]) * 16, "Partitions": []}
                   for i, n in enumerate(names)],
    })


@pytest.mark.parametrize("version", [1, 4, 9, 12])
def test_metadata_for_all_topics_shows_only_allowed_ones(version: int) -> None:
    conn = connection(OUTPOST)
    request = CODEC.encode_request(3, version, 9, "c", {"Topics": None})
    assert conn.receive_from_client(request).to_broker == request
    back = conn.receive_from_broker(metadata_answer(9, version, "deathstar-plans", "empire-announce"))
    _, body = CODEC.decode_response(3, version, back.to_client[4:])
    assert [t["Name"] for t in body["Topics"]] == ["empire-announce"]
    assert body["Brokers"][0]["Host"] == "broker"


def test_metadata_refused_topics_never_reach_the_broker() -> None:
    conn = connection(OUTPOST)
    request = CODEC.encode_request(3, 12, 9, "c", {"Topics": [
        {"TopicId": bytes(16), "Name": "deathstar-plans"}, {"TopicId": bytes(16), "Name": "empire-announce"}],
        "AllowAutoTopicCreation": True})
    out = conn.receive_from_client(request)
    upstream = CODEC.decode_request(out.to_broker[4:])
    assert upstream.body is not None
    assert [t["Name"] for t in upstream.body["Topics"]] == ["empire-announce"]
    assert out.records[0].refused_topics == ("deathstar-plans",)
    back = conn.receive_from_broker(metadata_answer(9, 12, "empire-announce"))
    _, body = CODEC.decode_response(3, 12, back.to_client[4:])
    assert sorted((t["Name"], t["ErrorCode"]) for t in body["Topics"]) == [
        ("deathstar-plans", 29), ("empire-announce", 0)]


def test_topic_ids_resolve_through_metadata() -> None:
    ids = TopicIds()
    conn = connection(OUTPOST, topic_ids=ids)
    fetch = {"ReplicaState": {"ReplicaId": -1}, "MaxWaitMs": 1, "MinBytes": 1, "Topics": [
        {"TopicId": bytes([2]) * 16, "Partitions": [{"Partition": 0, "FetchOffset": 0}]}]}
    before = conn.receive_from_client(CODEC.encode_request(1, 16, 1, "c", fetch))
    assert [r.verdict for r in before.records] == ["denied"]  # unknown id: not provably allowed
    conn.receive_from_broker(versions_v0_answer(1))
    conn.receive_from_client(CODEC.encode_request(3, 12, 2, "c", {"Topics": None}))
    conn.receive_from_broker(metadata_answer(2, 12, "deathstar-plans", "empire-announce"))
    after = conn.receive_from_client(CODEC.encode_request(1, 16, 3, "c", fetch))
    assert [(r.verdict, r.topics) for r in after.records] == [("forwarded", ("empire-announce",))]
    fetch["Topics"][0]["TopicId"] = bytes([1]) * 16
    stolen = conn.receive_from_client(CODEC.encode_request(1, 16, 4, "c", fetch))
    assert [(r.verdict, r.topics) for r in stolen.records] == [("denied", ("deathstar-plans",))]


def test_client_id_is_enforced_for_every_type() -> None:
    conn = connection(policy(KafkaRule(frozenset({12}), client_id="good")))
    hb = {"GroupId": "g", "GenerationId": 1, "MemberId": "m"}
    out = conn.receive_from_client(CODEC.encode_request(12, 3, 1, "evil", hb))
    assert [r.verdict for r in out.records] == ["denied"]
    back = conn.receive_from_broker(versions_v0_answer(1))
    assert CODEC.decode_response(12, 3, back.to_client[4:]) == (1, {"ThrottleTimeMs": 0, "ErrorCode": 30})
    ok = conn.receive_from_client(CODEC.encode_request(12, 3, 2, "good", hb))
    assert [r.verdict for r in ok.records] == ["forwarded"]


def test_api_versions_answer_is_capped_to_the_catalog() -> None:
    conn = connection()
    conn.receive_from_client(CODEC.encode_request(18, 0, 1, "c", {}))
    back = conn.receive_from_broker(versions_v0_answer(1))
    _, body = CODEC.decode_response(18, 0, back.to_client[4:])
    assert body["ApiKeys"] == [{"ApiKey": 0, "MinVersion": 0, "MaxVersion": 11}]


def test_api_versions_of_an_unknown_version_gets_unsupported_version() -> None:
    conn = connection()
    newer = struct.pack(">hhih", 18, 99, 4, 1) + b"c" + b"\x00\x00\x00"
    out = conn.receive_from_client(struct.pack(">i", len(newer)) + newer)
    assert out.to_broker == CODEC.encode_request(18, 0, 4, "c", {})
    back = conn.receive_from_broker(versions_v0_answer(4))
    _, body = CODEC.decode_response(18, 0, back.to_client[4:])
    assert body["ErrorCode"] == 35


def test_unknown_api_key() -> None:
    header = struct.pack(">hhih", 500, 0, 8, 1) + b"c" + b"body"
    frame = struct.pack(">i", len(header)) + header
    open_ = connection(policy(KafkaRule()))
    assert open_.receive_from_client(frame).to_broker == frame
    guarded = connection(policy(KafkaRule(topic="empire-announce")))
    out = guarded.receive_from_client(frame)
    assert out.to_broker == b"" and out.close is not None and "api key 500" in out.close


def test_answer_out_of_order_closes() -> None:
    conn = connection()
    conn.receive_from_client(produce(1, "empire-announce"))
    out = conn.receive_from_broker(produce_answer(2))
    assert out.close is not None and "out of order" in out.close
    assert out.to_client == b""


def test_large_answers_stream_through() -> None:
    conn = connection()
    conn.receive_from_client(produce(1, "empire-announce"))
    answer = CODEC.encode_response(0, 9, 1, {"Responses": [{"Name": "x" * 5000, "PartitionResponses": []}]})
    reads = [answer[i : i + 1000] for i in range(0, len(answer), 1000)]
    pieces = [conn.receive_from_broker(read).to_client for read in reads]
    assert all(pieces) and b"".join(pieces) == answer
    assert pieces[1] is reads[1]  # a read inside the answer is handed on as is


# -- error responses of every type and version ----------------------------------------

REQUESTS = sorted(CODEC.catalog.requests.values(), key=lambda s: s.name)


def error_codes(value):  # type: ignore[no-untyped-def]
    if isinstance(value, dict):
        for k, v in value.items():
            if k.endswith("ErrorCode"):
                yield v
            yield from error_codes(v)
    elif isinstance(value, list):
        for v in value:
            yield from error_codes(v)


@pytest.mark.parametrize("spec", REQUESTS, ids=lambda s: s.name)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_error_response_of_every_type_and_version(spec, data) -> None:  # type: ignore[no-untyped-def]
    version, body = data.draw(strategies.message(spec))
    request = CODEC.decode_request(CODEC.encode_request(spec.api_key, version, 77, "c", body)[4:])
    code = CODEC.authorization_error(spec.api_key)
    wire = CODEC.error_response(request)
    corr, answer = CODEC.decode_response(spec.api_key, version, wire[4:])
    assert corr == 77
    codes = list(error_codes(answer))
    assert set(codes) <= {code}
    # The request's topic list and the response's are paired entry by entry (side lists,
    # like Fetch's ForgottenTopicsData, get no answer).
    response_spec = CODEC.catalog.responses[spec.api_key]
    asked = _topic_lists(spec.fields, version)
    answered = _topic_lists(response_spec.fields, version)
    if asked and answered and request.body[asked[0].name] is not None:
        assert len(answer[answered[0].name]) == len(request.body[asked[0].name])
        if _by_name(asked[0], version) and _by_name(answered[0], version):
            key = next(f.name for f in asked[0].fields if f.entity == "topicName")
            names = {e[key] for e in request.body[asked[0].name]} - {None}
            assert names <= set(_strings(answer))


def _topic_lists(fields, version):  # type: ignore[no-untyped-def]
    return [f for f in fields if version in f.versions and f.is_array and _role(f) == "topics"]


def _by_name(field, version) -> bool:  # type: ignore[no-untyped-def]
    return any(
        version in f.versions and f.entity == "topicName" and not f.is_array
        for f in field.fields or ()
    )


def _strings(value):  # type: ignore[no-untyped-def]
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_authorization_errors_by_type() -> None:
    assert [CODEC.authorization_error(k) for k in (0, 1, 3, 19, 20, 11, 12, 10, 22, 26, 60, 18)] == [
        29, 29, 29, 29, 29, 30, 30, 30, 53, 53, 31, 31]


# -- fuzz --------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_garbage_from_the_client_never_raises(chunks) -> None:  # type: ignore[no-untyped-def]
    conn = connection()
    for chunk in chunks:
        out = conn.receive_from_client(chunk)
        if out.close is not None:
            assert conn.receive_from_client(b"more").close == out.close
            break


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_real_frames_never_raise(data) -> None:  # type: ignore[no-untyped-def]
    spec = data.draw(st.sampled_from(REQUESTS))
    version, body = data.draw(strategies.message(spec))
    frame = bytearray(CODEC.encode_request(spec.api_key, version, 1, "c", body))
    cut = data.draw(st.integers(8, len(frame)))
    payload = frame[4:cut]
    for _ in range(data.draw(st.integers(0, 3))):
        if payload:
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] = data.draw(st.integers(0, 255))
    conn = connection(policy(KafkaRule()))
    out = conn.receive_from_client(struct.pack(">i", len(payload)) + bytes(payload))
    assert out.close is None or out.close.startswith(("unparsable request", "denied request"))
    if out.close is None and out.to_broker:
        # Forwarded as it came; or (an ApiVersions of a version the catalog lacks) replaced
        # by ApiVersions v0 with the same correlation id; or a Metadata request without the
        # topics it may not name (invalid names), same version and correlation id.
        frame_in = struct.pack(">i", len(payload)) + bytes(payload)
        sent = bytes(out.to_broker)
        if sent != frame_in and sent[4:6] == struct.pack(">h", 3):
            assert sent[4:12] == frame_in[4:12]
            before, after = (CODEC.decode_request(f[4:]).body["Topics"] for f in (frame_in, sent))
            assert after == [t for t in before if t in after] and len(after) < len(before)
        else:
            assert sent == frame_in or (
                sent[4:8] == struct.pack(">hh", 18, 0) and sent[8:12] == frame_in[8:12]
            )


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_garbage_from_the_broker_never_raises(chunks) -> None:  # type: ignore[no-untyped-def]
    conn = connection(OUTPOST)
    conn.receive_from_client(produce(1, "empire-announce") + CODEC.encode_request(3, 12, 2, "c", {"Topics": None}))
    for chunk in chunks:
        if conn.receive_from_broker(chunk).close is not None:
            break


def test_oversized_and_negative_frames_close() -> None:
    conn = connection(settings=KafkaSettings(max_request_bytes=1000))
    out = conn.receive_from_client(struct.pack(">i", 1001))
    assert out.close is not None and "1001 bytes" in out.close
    assert connection().receive_from_client(struct.pack(">i", -5)).close is not None


def test_truncated_frame_waits() -> None:
    conn = connection()
    frame = produce(1, "empire-announce")
    out = conn.receive_from_client(frame[:-1])
    assert (out.to_broker, out.close) == (b"", None)


def test_bytes_after_a_request_body_are_ignored_like_the_broker_does() -> None:
    # librdkafka's AdminClient: Metadata v12 for all topics, then three stray bytes.
    payload = bytes.fromhex("0003000c00000003000772646b61666b610000000000010000")
    conn = connection(OUTPOST)
    out = conn.receive_from_client(struct.pack(">i", len(payload)) + payload)
    assert out.close is None
    assert [(r.api_key, r.verdict) for r in out.records] == [(3, "forwarded")]
    back = conn.receive_from_broker(metadata_answer(3, 12, "deathstar-plans", "empire-announce"))
    _, body = CODEC.decode_response(3, 12, back.to_client[4:])
    assert [t["Name"] for t in body["Topics"]] == ["empire-announce"]


@settings(max_examples=100, deadline=None)
@given(
    plan=st.lists(st.sampled_from(["allowed", "denied", "acks0"]), min_size=1, max_size=8),
    cuts=st.lists(st.integers(1, 40), min_size=1, max_size=6),
)
def test_answers_reach_the_client_in_request_order(plan, cuts) -> None:  # type: ignore[no-untyped-def]
    """Any mix of allowed, denied and acks=0 requests, in any chunking, answered in order."""
    conn = connection(OUTPOST)
    wire = b"".join(
        CODEC.encode_request(12, 4, i, "c", {"GroupId": "g", "GenerationId": 1, "MemberId": "m"})
        if kind == "allowed" else produce(i, "empire-announce", acks=0 if kind == "acks0" else 1)
        for i, kind in enumerate(plan)
    )
    upstream = feed(conn, wire, cuts)
    # The broker twin answers every request it received, in order.
    answers = b""
    for frame in split(upstream):
        request = CODEC.decode_request(frame[4:])
        assert request.api_key in (12, 18)  # denied produce never reaches the broker
        answers += (
            CODEC.encode_response(12, 4, request.correlation_id, {"ErrorCode": 0})
            if request.api_key == 12 else versions_v0_answer(request.correlation_id)
        )
    back = b"".join(conn.receive_from_broker(answers[i : i + 7]).to_client
                    for i in range(0, len(answers), 7))
    got = [CODEC.response_correlation_id(f[4:]) for f in split(back)]
    assert got == [i for i, kind in enumerate(plan) if kind != "acks0"]
    for frame, i in zip(split(back), got, strict=True):
        if plan[i] == "denied":
            _, body = CODEC.decode_response(0, 9, frame[4:])
            assert {p["ErrorCode"] for t in body["Responses"] for p in t["PartitionResponses"]} == {29}
    assert not conn.pending
