"""Every policy of the conformance corpus parses; the field sets follow the CRD schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.host import CONFORMANCE, SCHEMAS

from flagella.errors import FieldError
from flagella.policy.api import Policy, parse_policy
from flagella.policy.api import _parse as p

CASES = sorted(CONFORMANCE.glob("**/*.yaml"))


def case_policies(path: Path) -> list[tuple[str, dict[str, Any]]]:
    case = yaml.safe_load(path.read_text())
    if not isinstance(case, dict):
        return []
    found = [("policies", doc) for doc in case.get("policies") or []]
    for i, step in enumerate(case.get("steps") or []):
        found += [(f"steps[{i}].policies_in_effect", doc) for doc in step.get("policies_in_effect") or []]
    return found


def test_the_corpus_and_schemas_are_there() -> None:
    """A missing corpus fails: the parametrized tests below would otherwise be empty."""
    assert len(CASES) >= 50, f"conformance corpus missing or short at {CONFORMANCE}: {len(CASES)} cases"
    assert (SCHEMAS / "ciliumnetworkpolicies.yaml").exists(), f"CRD schemas missing at {SCHEMAS}"


@pytest.mark.parametrize("path", CASES, ids=[c.name for c in CASES])
def test_conformance_policies_parse(path: Path) -> None:
    for where, doc in case_policies(path):
        warnings: list[FieldError] = []
        policy = parse_policy(doc, f"{path.name}:{where}", warnings=warnings)
        assert isinstance(policy, Policy)
        assert policy.rules
        # Only the known oddity of kafka-01 (fromEndpoints in an egress rule) may warn.
        assert all("is not a field of an egress rule" in w.reason for w in warnings), warnings


# --- field sets mirror the CRD schema -----------------------------------------


def crd_spec(name: str) -> dict[str, Any]:
    crd = yaml.safe_load((SCHEMAS / name).read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def props(node: dict[str, Any], *path: str) -> dict[str, Any]:
    for step in path:
        node = node["properties"][step]
        if node.get("type") == "array":
            node = node["items"]
    return node


def names(node: dict[str, Any]) -> set[str]:
    return set(node["properties"])


@pytest.mark.parametrize("crd", ["ciliumnetworkpolicies.yaml", "ciliumclusterwidenetworkpolicies.yaml"])
def test_field_sets_follow_the_crd_schema(crd: str) -> None:
    top = crd_spec(crd)
    assert names(top) == set(p._CILIUM_DOCUMENT_FIELDS.names) - {"description"}
    for root in ("spec", "specs"):
        rule = props(top, root)
        assert names(rule) == set(p._RULE_FIELDS.names)
        for section, direction in (("ingress", p.INGRESS), ("egress", p.EGRESS),
                                   ("ingressDeny", p.INGRESS_DENY), ("egressDeny", p.EGRESS_DENY)):
            assert names(props(rule, section)) == set(direction.fields.names), section
            entities = props(rule, section, f"{direction.prefix}Entities")["enum"]
            assert set(entities) <= p.ENTITIES
            assert names(props(rule, section, f"{direction.prefix}CIDRSet")) == set(p._CIDR_SET_FIELDS.names)
            assert names(props(rule, section, "toPorts", "ports")) == set(p._PORT_FIELDS.names)
            assert names(props(rule, section, "icmps")) == set(p._ICMP_RULE_FIELDS.names)
            assert names(props(rule, section, "icmps", "fields")) == set(p._ICMP_FIELD_FIELDS.names)
        assert names(props(rule, "ingressDeny", "toPorts")) == {"ports"}
        assert names(props(rule, "ingress", "toPorts")) == set(p._PORT_RULE_FIELDS.names)
        l7 = props(rule, "ingress", "toPorts", "rules")
        assert names(l7) == set(p._L7_FIELDS.names)
        assert names(props(l7, "http")) == set(p._HTTP_FIELDS.names)
        assert names(props(l7, "http", "headerMatches")) == set(p._HEADER_MATCH_FIELDS.names)
        assert names(props(l7, "kafka")) == set(p._KAFKA_FIELDS.names)
        assert names(props(l7, "dns")) == set(p._FQDN_FIELDS.names)
        assert names(props(rule, "labels")) == set(p._RULE_LABEL_FIELDS.names)
        assert names(props(rule, "enableDefaultDeny")) == set(p._DEFAULT_DENY_FIELDS.names)
        assert names(props(rule, "egress", "toServices")) == set(p._SERVICE_FIELDS.names)
