"""L7 verdicts: does an HTTP or Kafka request pass an `L7Policy`?

HTTP (spec 5): a rule's method, path and host are regexes that must match
the *whole* value, with RE2 semantics as in Envoy (`flagella.policy.api._re2`:
linear time, no backtracking, the same program-size bound the proxy gets);
``:path`` includes the query string. ``headers`` entries are ``"Name: value"``
(exact value) or ``"Name"`` (presence); header names are case-insensitive.
Empty fields match anything; rules are ORed.

Kafka (spec 4.4): every topic of a request must be covered by some rule
that matches the request's api key, version and client id; a request with
no topics passes on any matching rule; a topic constraint does not stop
non-topic requests unless their api key carries topics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


#: Api keys whose requests carry topics (spec 4.4 "topic-carrying").
TOPIC_KEYS = frozenset({0, 1, 2, 3, 4, 5, 6, 8, 9, 19, 20, 21, 23, 24, 27, 28, 34, 35, 37})
#: Api keys whose topics and client id the 1.1 parser decodes.
PARSED_KEYS = frozenset({0, 1, 2, 3, 8, 9})


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
    if not rule.topic and not rule.client_id:
        return True
    if req.api_key in PARSED_KEYS:
        return not rule.client_id or rule.client_id == req.client_id
    return not (rule.topic and req.api_key in TOPIC_KEYS)


def kafka_allowed(rules: Sequence[KafkaRule], req: KafkaRequest) -> bool:
    remaining = set(req.topics) if req.api_key in PARSED_KEYS else set()
    for rule in rules:
        if not rule.topic or not remaining:
            if _kafka_rule_matches(rule, req):
                return True
        elif rule.topic in remaining and _kafka_rule_matches(rule, req):
            remaining.discard(rule.topic)
            if not remaining:
                return True
    return False


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
    return kafka_allowed(sorted(policy.kafka, key=_kafka_order), request)


def _kafka_order(rule: KafkaRule) -> tuple[object, ...]:
    return (rule.topic, rule.client_id, sorted(rule.api_keys), rule.api_version or -1)
