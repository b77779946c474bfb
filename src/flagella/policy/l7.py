"""L7 verdicts: does an HTTP or Kafka request pass an `L7Policy`?

HTTP (spec 5): a rule's method, path and host are regexes that must match
the *whole* value, with RE2 semantics as in Envoy (`flagella.policy.api._re2`:
linear time, no backtracking, the same program-size bound the proxy gets);
``:path`` includes the query string. ``headers`` entries are ``"Name: value"``
(exact value) or ``"Name"`` (presence); header names are case-insensitive.
Empty fields match anything; rules are ORed.

Kafka (spec 4.4, with 1.1's holes closed): a rule matches a request when
the api key is among its keys, the version equals its ``apiVersion`` (if set)
and the client id equals its ``clientID`` (if set), for *every* request type
(1.1 checked the client id of six types only). Every topic of the request
must be covered by a matching rule; a matching rule without a topic covers
all; a request with no topics passes on any matching rule. A request whose
topics could not be read (a type or version the codec does not know) passes
only a matching rule without a topic. A topic name Kafka itself would refuse
(`valid_topic_name`) is never allowed. Metadata for *all* topics passes like
any topic-less request; the proxy then filters the answer with
`kafka_topic_visible`, so the topic list does not leak (1.1 leaked it).

Both of two Kafka policies (`kafka_intersection`, the node proxy's egress
chain to a local broker that has ingress rules too) is one policy again: a
rule per compatible pair of rules, with the keys intersected and the
version, client id and topic the more specific of the two. A pair with two
different topics matches but covers no topic (`NO_TOPIC`, a name Kafka
never allows): each policy may pass a topic-less request on a topic rule, so
the pair must too. Then `kafka_allowed` of the result equals the AND of the
two (hypothesis checks it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from flagella.policy.api import HTTPRule, KafkaRule, full_match
from flagella.policy.mapstate import L7Policy


@dataclass(frozen=True)
class HTTPRequest:
    method: str = "GET"
    path: str = "/"
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class KafkaRequest:
    api_key: int
    api_version: int = 0
    client_id: str = ""
    topics: tuple[str, ...] = ()
    #: False when the proxy could not read the request's topics (unknown type or version).
    topics_known: bool = True


#: Kafka's own limits on topic names (``org.apache.kafka.common.internals.Topic``).
KAFKA_TOPIC_MAX_LENGTH = 249
_KAFKA_TOPIC_CHARS = re.compile(r"[a-zA-Z0-9._-]+")


def valid_topic_name(name: str) -> bool:
    """Whether Kafka accepts ``name`` as a topic: ``[a-zA-Z0-9._-]``, 1-249 chars, not . or .."""
    return (
        len(name) <= KAFKA_TOPIC_MAX_LENGTH
        and name not in (".", "..")
        and _KAFKA_TOPIC_CHARS.fullmatch(name) is not None
    )


def http_rule_matches(rule: HTTPRule, req: HTTPRequest) -> bool:
    if not (full_match(rule.method, req.method) and full_match(rule.path, req.path)):
        return False
    if not full_match(rule.host, req.host):
        return False
    headers = {k.lower(): v for k, v in req.headers.items()}
    for spec in rule.headers:
        name, sep, value = spec.partition(" ")
        name = name.rstrip(":").lower()
        if name not in headers:
            return False
        if sep and value and headers[name] != value:
            return False
    return True


def _kafka_rule_matches(rule: KafkaRule, req: KafkaRequest) -> bool:
    if rule.api_keys and req.api_key not in rule.api_keys:
        return False
    if rule.api_version is not None and rule.api_version != req.api_version:
        return False
    return not rule.client_id or rule.client_id == req.client_id


def kafka_allowed(rules: Iterable[KafkaRule], req: KafkaRequest) -> bool:
    """Whether ``req`` passes ``rules`` (see the module docstring)."""
    if not all(valid_topic_name(t) for t in req.topics):
        return False
    covered: set[str] = set()
    matched = False
    for rule in rules:
        if not _kafka_rule_matches(rule, req):
            continue
        if not rule.topic:
            return True
        matched = True
        covered.add(rule.topic)
    if not matched or not req.topics_known:
        return False
    return covered.issuperset(req.topics)


def kafka_topic_visible(rules: Iterable[KafkaRule], req: KafkaRequest, topic: str) -> bool:
    """Whether ``topic`` may appear in the answer to ``req`` (a Metadata request)."""
    return kafka_allowed(rules, replace(req, topics=(topic,), topics_known=True))


#: The topic of a rule that matches but covers no topic (not a valid topic name).
NO_TOPIC = "\x00"


def _rule_and(a: KafkaRule, b: KafkaRule) -> KafkaRule | None:
    if a.api_keys and b.api_keys:
        keys = a.api_keys & b.api_keys
        if not keys:
            return None
    else:
        keys = a.api_keys or b.api_keys
    if None not in (a.api_version, b.api_version) and a.api_version != b.api_version:
        return None
    if a.client_id and b.client_id and a.client_id != b.client_id:
        return None
    topic = NO_TOPIC if a.topic and b.topic and a.topic != b.topic else a.topic or b.topic
    version = a.api_version if a.api_version is not None else b.api_version
    return KafkaRule(keys, version, a.client_id or b.client_id, topic)


def kafka_intersection(a: L7Policy, b: L7Policy) -> L7Policy:
    """The Kafka policy that passes what both ``a`` and ``b`` pass (module docstring)."""
    if a.wildcard:
        return b
    if b.wildcard:
        return a
    rules = {r for ra in a.kafka for rb in b.kafka if (r := _rule_and(ra, rb)) is not None}
    return L7Policy("kafka", kafka=frozenset(rules))


def l7_allows(policy: L7Policy, request: HTTPRequest | KafkaRequest) -> bool:
    """Whether the proxy forwards ``request`` under ``policy``."""
    if policy.wildcard:
        return True
    if isinstance(request, HTTPRequest):
        if policy.parser != "http":
            return False
        return any(http_rule_matches(r, request) for r in policy.http)
    if policy.parser != "kafka":
        return False
    return kafka_allowed(policy.kafka, request)
