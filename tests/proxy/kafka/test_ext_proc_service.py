"""`KafkaExtProcService` driven directly with ext_proc messages (the Envoy run is in
test_kafka_envoy.py): identity from the forwarded metadata, per-direction answers,
and fail-closed on anything it cannot judge."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from flagella.policy.api import KafkaRule
from flagella.policy.mapstate import L7Policy
from flagella.proxy.kafka import KafkaCodec
from flagella.proxy.kafka_envoy import (
    RBAC_NAMESPACE,
    ChainKey,
    KafkaExtProcService,
    KafkaRedirect,
    Peer,
    WireRequest,
    data_response,
    identity_rbac,
    ip_principals,
    kafka_enforcement_filters,
    kafka_filter_chain,
    parse_request,
    peer_from_metadata,
    sidecar_grpc_service,
    spiffe_principals,
)

CODEC = KafkaCodec()
CHAIN = ChainKey(12, False, 9092)
PRODUCE_ANNOUNCE = L7Policy("kafka", kafka=frozenset({KafkaRule(frozenset({0, 3, 18}), topic="empire-announce")}))
Response = pb.ProcessingResponse


def metadata(policy_id: str | None, chain: ChainKey = CHAIN) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    fields = req.metadata.filter_metadata[RBAC_NAMESPACE]
    fields.update({f"{chain.stat_prefix}shadow_engine_result": "allowed" if policy_id else "denied"})
    if policy_id is not None:
        fields.update({f"{chain.stat_prefix}shadow_effective_policy_id": policy_id})
    return req


def read(data: bytes, policy_id: str | None = "identity-1003") -> pb.ProcessingRequest:
    req = metadata(policy_id)
    req.read_data.data = data
    return req


def write(data: bytes) -> pb.ProcessingRequest:
    req = metadata("identity-1003")
    req.write_data.data = data
    return req


PATHS = ["protobuf", "wire"]
path = PATHS[0]


@pytest.fixture(autouse=True, scope="module", params=PATHS)
def _path(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test runs on both service paths: `Process` (protobuf messages) and
    `process_wire` (serialized messages, what `register` serves)."""
    global path
    path = request.param
    yield
    path = PATHS[0]


def run(service: KafkaExtProcService, requests: list[pb.ProcessingRequest]) -> list[Response]:
    async def feed() -> AsyncIterator[pb.ProcessingRequest]:
        for r in requests:
            yield r

    async def feed_wire() -> AsyncIterator[bytes]:
        for r in requests:
            yield r.SerializeToString()

    async def collect() -> list[Response]:
        if path == "wire":
            return [Response.FromString(r) async for r in service.process_wire(feed_wire(), None)]
        return [r async for r in service.Process(feed(), None)]  # type: ignore[arg-type]

    return asyncio.run(collect())


def produce(corr: int, topic: str) -> bytes:
    return CODEC.encode_request(0, 3, corr, "c", {
        "TransactionalId": None, "Acks": 1, "TimeoutMs": 1000,
        "TopicData": [{"Name": topic, "PartitionData": [{"Index": 0, "Records": None}]}]})


def test_peer_from_metadata_reads_chain_and_identity() -> None:
    fields = {k: v.string_value for k, v in metadata("identity-1003").metadata.filter_metadata[RBAC_NAMESPACE].fields.items()}
    assert peer_from_metadata({RBAC_NAMESPACE: fields}) == Peer(CHAIN, 1003)
    unmatched = {k: v.string_value for k, v in metadata(None).metadata.filter_metadata[RBAC_NAMESPACE].fields.items()}
    assert peer_from_metadata({RBAC_NAMESPACE: unmatched}) == Peer(CHAIN, 2)  # world


def test_identity_and_chain_reach_the_rules_lookup() -> None:
    asked: list[tuple[ChainKey, int]] = []

    def rules(chain: ChainKey, identity: int) -> L7Policy:
        asked.append((chain, identity))
        return PRODUCE_ANNOUNCE

    service = KafkaExtProcService(rules, codec=CODEC)
    [allowed] = run(service, [read(produce(7, "empire-announce"))])
    assert asked == [(CHAIN, 1003)]
    assert allowed.read_data.data == produce(7, "empire-announce")
    assert allowed.data_processing_status == Response.MODIFIED


def test_denied_request_is_substituted_and_its_answer_replaced() -> None:
    service = KafkaExtProcService(lambda c, i: PRODUCE_ANNOUNCE, codec=CODEC)
    denied = produce(8, "deathstar-plans")
    half = len(denied) // 2
    held, substituted, answered = run(service, [
        read(denied[:half]), read(denied[half:]),
        write(CODEC.encode_response(18, 0, 8, {"ErrorCode": 0, "ApiKeys": []})),
    ])
    assert held.read_data.data == b"" and held.connection_status == Response.CONTINUE
    assert CODEC.decode_request(substituted.read_data.data[4:]).api_key == 18  # ApiVersions v0
    corr, body = CODEC.decode_response(0, 3, answered.write_data.data[4:])
    assert corr == 8
    assert body["Responses"][0]["PartitionResponses"][0]["ErrorCode"] == 29


def test_no_rules_or_no_chain_closes() -> None:
    service = KafkaExtProcService(lambda c, i: None, codec=CODEC)
    [closed] = run(service, [read(produce(1, "empire-announce"))])
    assert closed.connection_status == Response.CLOSE
    other = pb.ProcessingRequest()
    other.read_data.data = b"x"
    [closed] = run(KafkaExtProcService(lambda c, i: PRODUCE_ANNOUNCE, codec=CODEC), [other])
    assert closed.connection_status == Response.CLOSE


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=4, max_size=300))
def test_garbage_closes_or_waits_never_raises(data: bytes) -> None:
    service = KafkaExtProcService(lambda c, i: PRODUCE_ANNOUNCE, codec=CODEC)
    responses = run(service, [read(data), read(data)])
    assert all(r.connection_status in (Response.CONTINUE, Response.CLOSE) for r in responses)
    if responses[-1].connection_status == Response.CLOSE:
        assert service.closes


def test_chain_builders() -> None:
    import ipaddress

    from flagella.proxy.rbac import PeerSet

    principals = ip_principals({1003: PeerSet((ipaddress.ip_network("10.244.0.9/32"),))})
    rbac = identity_rbac(CHAIN, principals)
    assert list(rbac.shadow_rules.policies) == ["identity-1003"]
    assert rbac.shadow_rules_stat_prefix == CHAIN.stat_prefix
    chain = kafka_filter_chain(KafkaRedirect(CHAIN, (ipaddress.ip_address("10.244.0.5"),)), principals, "flagella-xds")
    assert [f.name for f in chain.filters] == [
        "envoy.filters.network.rbac", "envoy.filters.network.ext_proc", "envoy.filters.network.tcp_proxy"]
    assert chain.filter_chain_match.destination_port.value == 9092
    assert chain.filter_chain_match.prefix_ranges[0].address_prefix == "10.244.0.5"


def test_sidecar_filters_use_spiffe_and_google_grpc() -> None:
    from envoy.extensions.filters.network.ext_proc.v3 import ext_proc_pb2

    spiffe = spiffe_principals({1003: ["spiffe://cluster.local/ns/default/sa/outpost"]})
    rbac_filter, ext_proc_filter = kafka_enforcement_filters(CHAIN, spiffe, sidecar_grpc_service("/var/run/flagella/agent.sock"))
    rbac = identity_rbac(CHAIN, spiffe)
    unpacked = type(rbac)()
    assert rbac_filter.typed_config.Unpack(unpacked) and unpacked == rbac
    [principal] = rbac.shadow_rules.policies["identity-1003"].principals
    assert principal.authenticated.principal_name.exact == "spiffe://cluster.local/ns/default/sa/outpost"
    config = ext_proc_pb2.NetworkExternalProcessor()
    assert ext_proc_filter.typed_config.Unpack(config)
    assert config.grpc_service.google_grpc.target_uri == "unix:/var/run/flagella/agent.sock"
    assert list(config.metadata_options.forwarding_namespaces.untyped) == [RBAC_NAMESPACE]
    assert not config.failure_mode_allow


def test_refresh_feeds_new_rules_to_open_connections_and_records_name_the_peer() -> None:
    """A policy change reaches a connection that is already open (from its next request);
    a peer left without rules is denied everything, answered in order, not cut off."""
    current: dict[str, L7Policy | None] = {"rules": PRODUCE_ANNOUNCE}
    seen: list[tuple[Peer, str, tuple[str, ...]]] = []
    service = KafkaExtProcService(
        lambda c, i: current["rules"], codec=CODEC,
        on_peer_record=lambda peer, rec: seen.append((peer, rec.verdict, rec.topics)),
    )

    async def scenario() -> list[Response]:
        first_done, refreshed = asyncio.Event(), asyncio.Event()

        async def feed() -> AsyncIterator[pb.ProcessingRequest]:
            yield read(produce(1, "empire-announce"))
            await first_done.wait()
            await refreshed.wait()
            yield read(produce(2, "empire-announce"))

        out: list[Response] = []
        async for response in service.Process(feed(), None):  # type: ignore[arg-type]
            out.append(response)
            if len(out) == 1:
                assert service.open_connections == 1
                first_done.set()
                current["rules"] = None  # the chain's rules for this peer are gone
                service.refresh()
                refreshed.set()
        return out

    allowed, denied = asyncio.run(scenario())
    assert allowed.read_data.data == produce(1, "empire-announce")
    # The second produce is substituted (ApiVersions v0, same correlation id) and stays open.
    assert denied.read_data.data != produce(2, "empire-announce")
    assert denied.connection_status != Response.CLOSE
    assert seen == [(Peer(CHAIN, 1003), "forwarded", ("empire-announce",)),
                    (Peer(CHAIN, 1003), "denied", ("empire-announce",))]


def test_unparsable_frames_are_counted() -> None:
    service = KafkaExtProcService(lambda c, i: PRODUCE_ANNOUNCE, codec=CODEC)
    [closed] = run(service, [read(b"\x00\x00\x00\x0c\x00\x00\x00\x00garbagegarb")])
    assert closed.connection_status == Response.CLOSE
    assert service.unparsable == 1 and service.closes[0].startswith("unparsable")
    run(service, [read(produce(3, "empire-announce"))])  # a good frame: not counted
    assert service.unparsable == 1


# -- the wire path's protobuf reading and writing ----------------------------------------


@settings(max_examples=200, deadline=None)
@given(upstream=st.booleans(), payload=st.binary(max_size=300), eos=st.booleans())
def test_data_response_is_what_protobuf_writes(upstream: bool, payload: bytes, eos: bool) -> None:
    expected = Response(data_processing_status=Response.MODIFIED)
    answer = expected.read_data if upstream else expected.write_data
    answer.data = payload
    answer.end_of_stream = eos
    assert data_response(upstream, payload, eos) == expected.SerializeToString()
    assert data_response(upstream, memoryview(payload), eos) == expected.SerializeToString()


def _as_protobuf(request: WireRequest) -> tuple[bool, bytes, bool, object]:
    return request.upstream, bytes(request.data), request.end_of_stream, request.metadata()


def _expected(raw: bytes) -> tuple[bool, bytes, bool, object]:
    message = pb.ProcessingRequest.FromString(raw)
    upstream = message.HasField("read_data")
    data = message.read_data if upstream else message.write_data
    return upstream, data.data, data.end_of_stream, message.metadata


@settings(max_examples=200, deadline=None)
@given(
    direction=st.sampled_from(["read", "write", "none"]), payload=st.binary(max_size=300),
    eos=st.booleans(), policy=st.none() | st.sampled_from(["identity-1003", "identity-7"]),
)
def test_parse_request_reads_what_protobuf_reads(direction: str, payload: bytes, eos: bool, policy: str | None) -> None:
    message = metadata(policy)
    if direction != "none":
        data = message.read_data if direction == "read" else message.write_data
        data.data = payload
        data.end_of_stream = eos
    raw = message.SerializeToString()
    assert _as_protobuf(parse_request(raw)) == _expected(raw)


def test_parse_request_leaves_unusual_messages_to_protobuf() -> None:
    first, second = read(b"abc"), read(b"def")
    second.read_data.end_of_stream = True
    merged = first.SerializeToString() + second.SerializeToString()  # repeated fields merge
    both = read(b"abc")
    both.write_data.data = b"xyz"  # both directions: read wins, as HasField says
    for raw in (merged, both.SerializeToString()):
        assert _as_protobuf(parse_request(raw)) == _expected(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_parse_request_of_garbage_agrees_with_protobuf_or_raises(raw: bytes) -> None:
    try:
        expected = _expected(raw)
    except Exception:
        with pytest.raises(Exception):  # noqa: B017,PT011 (protobuf's DecodeError or ours)
            _as_protobuf(parse_request(raw))
        return
    assert _as_protobuf(parse_request(raw)) == expected


SRC = Path(__file__).resolve().parents[3] / "src"
_FAULTS = """
import resource, sys
from flagella.proxy.kafka_envoy import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for warm in (True, False):
    before = faults()
    for _ in range(20 if warm else 100):  # message-sized buffers, as a produce stream makes them
        held = [bytearray(b"x" * ((1 << 20) - 7 * j)) for j in range(3)]
        del held
print(faults() - before)
"""


def test_tuned_allocator_reuses_message_sized_buffers() -> None:
    """After `tune_allocator` (what the agent runs at start), 1 MiB buffers freed and made
    again reuse the heap instead of faulting every page in anew (as glibc's defaults do)."""
    def page_faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(SRC)}, check=True)
        return int(run.stdout)

    pages = 100 * 3 * (1 << 20) // resource.getpagesize()
    assert page_faults("plain") > pages // 2
    assert page_faults("tuned") < pages // 100
