"""The codec against Kafka's own definitions: every type, every version, both directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagella.proxy.kafka._protocol import KafkaCodec
from flagella.proxy.kafka._schema import catalog_from_definitions, compact_definitions
from tests.proxy.kafka import strategies

DEFINITIONS = Path(__file__).resolve().parents[3] / ".." / "shared" / "schemas" / "kafka" / "message"
CODEC = KafkaCodec()
REQUESTS = sorted(CODEC.catalog.requests.values(), key=lambda s: s.name)
RESPONSES = sorted(CODEC.catalog.responses.values(), key=lambda s: s.name)


def test_packaged_definitions_are_the_shared_ones() -> None:
    texts = [p.read_text("utf-8") for p in sorted(DEFINITIONS.glob("*.json"))]
    assert len(texts) == 154
    packaged = json.loads(
        (Path(__file__).resolve().parents[3] / "src/flagella/proxy/kafka/messages.json").read_text()
    )
    assert packaged == compact_definitions(texts)
    assert catalog_from_definitions(packaged) == CODEC.catalog


def test_catalog_covers_every_api() -> None:
    assert set(CODEC.catalog.requests) == set(CODEC.catalog.responses)
    assert len(CODEC.catalog.requests) == 76
    assert CODEC.catalog.requests[1].valid.hi == 16


@pytest.mark.parametrize("spec", REQUESTS, ids=lambda s: s.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_request_round_trip(spec, data) -> None:  # type: ignore[no-untyped-def]
    version, body = data.draw(strategies.message(spec))
    client_id = data.draw(st.none() | st.text(max_size=8))
    if spec.api_key == 7 and version == 0:
        client_id = None  # ControlledShutdown v0 uses header v0, which has no client id
    wire = CODEC.encode_request(spec.api_key, version, 12345, client_id, body)
    request = CODEC.decode_request(wire[4:])
    assert (request.api_key, request.api_version, request.correlation_id) == (
        spec.api_key, version, 12345,
    )
    assert request.client_id == client_id
    assert request.body == body
    assert request.frame == wire
    assert CODEC.encode_request(spec.api_key, version, 12345, client_id, request.body) == wire


@pytest.mark.parametrize("spec", RESPONSES, ids=lambda s: s.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_response_round_trip(spec, data) -> None:  # type: ignore[no-untyped-def]
    version, body = data.draw(strategies.message(spec))
    wire = CODEC.encode_response(spec.api_key, version, -7, body)
    assert CODEC.response_correlation_id(wire[4:]) == -7
    correlation_id, decoded = CODEC.decode_response(spec.api_key, version, wire[4:])
    assert (correlation_id, decoded) == (-7, body)
    assert CODEC.encode_response(spec.api_key, version, -7, decoded) == wire
