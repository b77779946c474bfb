"""Kafka L7 verdicts (spec 4.2-4.4), with 1.1's holes closed (issue 8)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flagella.policy.api import KAFKA_ROLES, KafkaRule
from flagella.policy.l7 import (
    NO_TOPIC,
    KafkaRequest,
    kafka_allowed,
    kafka_intersection,
    kafka_topic_visible,
    l7_allows,
    valid_topic_name,
)
from flagella.policy.mapstate import L7Policy

PRODUCE = KAFKA_ROLES["produce"]
CONSUME = KAFKA_ROLES["consume"]
HQ = [KafkaRule(PRODUCE, topic="deathstar-plans"), KafkaRule(PRODUCE, topic="empire-announce")]
OUTPOST = [KafkaRule(CONSUME, topic="empire-announce")]


def req(key: int, *topics: str, version: int = 0, client: str = "", known: bool = True) -> KafkaRequest:
    return KafkaRequest(key, version, client, topics, known)


CASES = [
    # spec 4.2: role expansion
    ("produce role allows produce", HQ, req(0, "empire-announce"), True),
    ("produce role allows ApiVersions", HQ, req(18), True),
    ("produce role allows Metadata of its topic", HQ, req(3, "deathstar-plans"), True),
    ("produce role denies fetch", HQ, req(1, "empire-announce"), False),
    ("consume role allows fetch", OUTPOST, req(1, "empire-announce"), True),
    ("consume role allows heartbeat", OUTPOST, req(12), True),
    ("consume role allows ListOffsets", OUTPOST, req(2, "empire-announce"), True),
    ("consume role denies produce (the fake announcement)", OUTPOST, req(0, "empire-announce"), False),
    ("consume role denies other topics (the stolen plans)", OUTPOST, req(1, "deathstar-plans"), False),
    # spec 4.4: every topic must be covered, possibly by several rules
    ("two topics, two rules", HQ, req(0, "empire-announce", "deathstar-plans"), True),
    ("one uncovered topic denies all", HQ, req(0, "empire-announce", "empire-terminal-logs"), False),
    ("no rules deny", [], req(18), False),
    ("empty rule allows everything", [KafkaRule()], req(0, "x"), True),
    # apiVersion: exact
    ("apiVersion equal", [KafkaRule(frozenset({0}), api_version=9)], req(0, "t", version=9), True),
    ("apiVersion differs", [KafkaRule(frozenset({0}), api_version=9)], req(0, "t", version=8), False),
    # clientID: every type (1.1 ignored it outside six types: GH-3097)
    ("clientID on Heartbeat", [KafkaRule(frozenset({12}), client_id="ok")], req(12, client="evil"), False),
    ("clientID on FindCoordinator", [KafkaRule(frozenset({10}), client_id="ok")], req(10, client="ok"), True),
    ("clientID on CreateTopics", [KafkaRule(client_id="ok")], req(19, "t", client="evil"), False),
    # topic rules and types 1.1 did not parse: now judged by their topics
    ("CreateTopics of an allowed topic", [KafkaRule(topic="t")], req(19, "t"), True),
    ("DeleteTopics of another topic", [KafkaRule(topic="t")], req(20, "u"), False),
    ("topic rule, topic-less request", [KafkaRule(topic="t")], req(12), True),
    ("unreadable topics pass only topic-less rules", [KafkaRule(topic="t")], req(1, known=False), False),
    ("unreadable topics and a topic-less rule", [KafkaRule(frozenset({1}))], req(1, known=False), True),
    # Kafka's topic name rules
    ("illegal character", [KafkaRule()], req(0, "a/b"), False),
    ("dot", [KafkaRule()], req(0, "."), False),
    ("dot dot", [KafkaRule()], req(0, ".."), False),
    ("250 characters", [KafkaRule()], req(0, "a" * 250), False),
    ("249 characters", [KafkaRule()], req(0, "a" * 249), True),
]


@pytest.mark.parametrize(("rules", "request_", "allowed"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_kafka_verdict(rules, request_, allowed) -> None:  # type: ignore[no-untyped-def]
    assert kafka_allowed(rules, request_) is allowed
    assert kafka_allowed(list(reversed(rules)), request_) is allowed  # order never matters


def test_metadata_for_all_topics_shows_only_allowed_ones() -> None:
    everything = req(3)
    assert kafka_allowed(OUTPOST, everything)
    visible = [t for t in ("empire-announce", "deathstar-plans", "empire-terminal-logs")
               if kafka_topic_visible(OUTPOST, everything, t)]
    assert visible == ["empire-announce"]


@pytest.mark.parametrize(("name", "valid"), [
    ("empire-announce", True), ("a.b_c-D9", True), ("", False), (".", False), ("..", False),
    ("...", True), ("a b", False), ("a\\b", False), ("é", False), ("x" * 249, True), ("x" * 250, False),
])
def test_topic_names(name: str, valid: bool) -> None:
    assert valid_topic_name(name) is valid


# -- both of two policies (the node's egress chain to a local broker with ingress rules) --

_rules = st.builds(
    KafkaRule,
    api_keys=st.frozensets(st.sampled_from([0, 1, 3]), max_size=2),
    api_version=st.sampled_from([None, 0, 1]),
    client_id=st.sampled_from(["", "a", "b"]),
    topic=st.sampled_from(["", "t1", "t2"]),
)
_policies = st.builds(
    lambda rules, wild: L7Policy("kafka", kafka=frozenset(rules), wildcard=wild),
    st.lists(_rules, max_size=3), st.booleans(),
)
_requests = st.builds(
    KafkaRequest,
    api_key=st.sampled_from([0, 1, 3]),
    api_version=st.sampled_from([0, 1]),
    client_id=st.sampled_from(["", "a", "b"]),
    topics=st.lists(st.sampled_from(["t1", "t2", "t3"]), max_size=2, unique=True).map(tuple),
    topics_known=st.booleans(),
)


@settings(max_examples=2000)
@given(_policies, _policies, _requests)
def test_intersection_passes_exactly_what_both_pass(a: L7Policy, b: L7Policy, request_: KafkaRequest) -> None:
    both = kafka_intersection(a, b)
    assert l7_allows(both, request_) == (l7_allows(a, request_) and l7_allows(b, request_))
    topic = "t1"
    assert (both.wildcard or kafka_topic_visible(both.kafka, request_, topic)) == (
        (a.wildcard or kafka_topic_visible(a.kafka, request_, topic))
        and (b.wildcard or kafka_topic_visible(b.kafka, request_, topic))
    )


def test_intersection_of_different_topics_passes_topicless_requests_only() -> None:
    a = L7Policy("kafka", kafka=frozenset({KafkaRule(frozenset({0, 3}), topic="t1")}))
    b = L7Policy("kafka", kafka=frozenset({KafkaRule(frozenset({3}), topic="t2")}))
    both = kafka_intersection(a, b)
    assert both.kafka == {KafkaRule(frozenset({3}), topic=NO_TOPIC)}
    assert l7_allows(both, req(3))  # Metadata for all topics: both pass it
    assert not l7_allows(both, req(3, "t1")) and not l7_allows(both, req(0, "t1"))
    assert not kafka_topic_visible(both.kafka, req(3), "t1")
    assert not valid_topic_name(NO_TOPIC)
