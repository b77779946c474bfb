"""Fuzzing: no input makes the loader raise anything but PolicyValidationError."""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.host import CONFORMANCE

from flagella.errors import PolicyValidationError
from flagella.policy.api import Policy, load_policies, parse_policy

CORPUS = CONFORMANCE

#: Field names that steer random documents deep into the parser.
VOCABULARY = [
    "apiVersion", "kind", "metadata", "name", "namespace", "spec", "specs", "endpointSelector",
    "nodeSelector", "ingress", "egress", "ingressDeny", "egressDeny", "enableDefaultDeny", "labels",
    "description", "fromEndpoints", "toEndpoints", "fromRequires", "toRequires", "fromCIDR", "toCIDR",
    "fromCIDRSet", "toCIDRSet", "cidr", "except", "cidrGroupRef", "fromEntities", "toEntities",
    "toFQDNs", "toServices", "toGroups", "toNodes", "fromNodes", "toPorts", "ports", "port", "endPort",
    "protocol", "rules", "http", "kafka", "dns", "l7proto", "method", "path", "host", "headers",
    "headerMatches", "value", "mismatch", "role", "apiKey", "apiVersion", "topic", "clientID", "icmps",
    "fields", "type", "family", "matchLabels", "matchExpressions", "key", "operator", "values",
    "authentication", "mode", "podSelector", "namespaceSelector", "ipBlock", "from", "to",
    "policyTypes", "items", "HTTP", "ToPorts", "serverNames", "matchName", "matchPattern",
]
SCALAR_WORDS = [
    "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy", "List", "TCP", "udp",
    "ANY", "SCTP", "80", "0", "65536", "http", "10.0.0.0/8", "10.0.0.1", "::1/128", "world", "all",
    "In", "notin", "Exists", "produce", "consume", "fetch", "Ingress", "Egress", "cilium.io/v2",
    "networking.k8s.io/v1", "EchoRequest", "IPv6", "reserved:init", "$host", "k8s:app", "/a(", "*",
]

scalars = (
    st.none() | st.booleans() | st.integers(-70000, 70000) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(SCALAR_WORDS)
)
keys = st.sampled_from(VOCABULARY) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=30,
)
documents = st.fixed_dictionaries(
    {"kind": st.sampled_from(["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy"]),
     "metadata": st.dictionaries(st.sampled_from(["name", "namespace"]), scalars, max_size=2)},
    optional={"spec": values, "specs": values, "apiVersion": scalars},
)

#: Examples per test; FLAGELLA_FUZZ_EXAMPLES raises it for a longer local run.
EXAMPLES = int(os.environ.get("FLAGELLA_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def corpus_policies() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted(CORPUS.glob("**/*.yaml")):
        case = yaml.safe_load(path.read_text())
        if isinstance(case, dict):
            found += case.get("policies") or []
            for step in case.get("steps") or []:
                found += step.get("policies_in_effect") or []
    return found or [{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                      "metadata": {"name": "p"}, "spec": {"endpointSelector": {}, "ingress": [
                          {"fromEndpoints": [{}], "toPorts": [{"ports": [{"port": "80"}]}]}]}}]


REAL = corpus_policies()


def parses_or_rejects(obj: Any) -> None:
    try:
        assert isinstance(parse_policy(obj), Policy)
    except PolicyValidationError as exc:
        assert exc.errors


def loads_or_rejects(text: str) -> None:
    try:
        assert all(isinstance(p, Policy) for p in load_policies(text))
    except PolicyValidationError as exc:
        assert exc.errors


@FUZZ
@given(values)
def test_random_values(obj: Any) -> None:
    loads_or_rejects(yaml.safe_dump(obj))
    if isinstance(obj, dict):
        parses_or_rejects(obj)


@FUZZ
@given(documents)
def test_random_documents(doc: dict[str, Any]) -> None:
    parses_or_rejects(doc)


@FUZZ
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    loads_or_rejects(text)


@FUZZ
@given(st.data())
def test_mutated_real_policies(data: st.DataObject) -> None:
    doc = copy.deepcopy(data.draw(st.sampled_from(REAL)))
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(doc, data)
    parses_or_rejects(doc)


def mutate(doc: dict[str, Any], data: st.DataObject) -> None:
    """Walk to a random node and delete, replace or retype one of its members."""
    node: Any = doc
    while True:
        members = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not members:
            return
        member = data.draw(st.sampled_from(members))
        child = node[member]
        if isinstance(child, dict | list) and child and data.draw(st.booleans()):
            node = child
            continue
        action = data.draw(st.sampled_from(["delete", "replace", "retype", "rekey"]))
        if action == "delete":
            del node[member]
        elif action == "replace":
            node[member] = data.draw(values)
        elif action == "retype":
            node[member] = data.draw(st.sampled_from([[child], {"x": child}, str(child), 7, None, True]))
        elif isinstance(node, dict):
            node[data.draw(keys)] = node.pop(member)
        return
