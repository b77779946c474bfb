"""Loading YAML/JSON text and files: documents, lists, atomicity, error labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flagella.errors import FieldError, PolicyValidationError
from flagella.policy.api import load_policies, load_policy_files

GOOD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1, namespace: default}
spec:
  endpointSelector: {matchLabels: {org: empire}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""

KNP = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}}
"""

BAD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad1, namespace: prod}
spec:
  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: "99999"}]}]
"""

BAD_CCNP = """\
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: bad2}
spec:
  endpointSelector: {}
  egress: [{toEntities: [moon]}]
"""


def errors(text: str, source: str = "p.yaml") -> list[FieldError]:
    with pytest.raises(PolicyValidationError) as info:
        load_policies(text, source)
    return info.value.errors


def test_multi_document_with_empty_documents() -> None:
    policies = load_policies(f"---\n{GOOD}---\n---\n# only a comment\n---\n{KNP}")
    assert [p.key for p in policies] == [("CiliumNetworkPolicy", "default", "rule1"),
                                         ("NetworkPolicy", "x", "deny")]


def test_empty_text() -> None:
    assert load_policies("") == []
    assert load_policies("---\n...\n") == []


def test_one_bad_document_fails_all_and_every_error_is_listed() -> None:
    found = errors(f"{GOOD}---\n{BAD}---\n{KNP}---\n{BAD_CCNP}")
    assert [(e.document, e.path, e.reason) for e in found] == [
        ("p.yaml#2 (CiliumNetworkPolicy prod/bad1)", "spec.ingress[0].toPorts[0].ports[0].port",
         "must be 0-65535"),
        ("p.yaml#4 (CiliumClusterwideNetworkPolicy bad2)", "spec.egress[0].toEntities[0]",
         "unsupported entity: moon"),
    ]


def test_kind_list_and_top_level_list() -> None:
    good = json.loads(json.dumps(load_policies(GOOD)[0].source))
    knp = load_policies(KNP)[0].source
    listing = {"apiVersion": "v1", "kind": "List", "items": [good, knp]}
    assert len(load_policies(json.dumps(listing))) == 2
    assert len(load_policies(json.dumps([good, None, knp]))) == 2
    bad = dict(good, spec={})
    found = errors(json.dumps({"kind": "List", "items": [good, bad]}))
    assert {e.document for e in found} == {"p.yaml#1.items[1] (CiliumNetworkPolicy default/rule1)"}
    found = errors(json.dumps([good, bad]))
    assert {e.document for e in found} == {"p.yaml#1[1] (CiliumNetworkPolicy default/rule1)"}


def test_typed_list_items_inherit_kind() -> None:
    item = {"metadata": {"name": "a", "namespace": "n"}, "spec": {"podSelector": {}}}
    text = json.dumps({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicyList", "items": [item]})
    [policy] = load_policies(text)
    assert policy.key == ("NetworkPolicy", "n", "a")


def test_json_text() -> None:
    [policy] = load_policies(json.dumps(load_policies(GOOD)[0].source))
    assert policy.name == "rule1"


def test_malformed_yaml_names_the_line() -> None:
    [error] = errors(f"{GOOD}---\nkind: CiliumNetworkPolicy\nmetadata: {{name: x\nspec: [\n")
    assert error.document == "p.yaml#2"
    assert error.path.startswith("line ")
    assert error.reason.startswith("invalid YAML")


def test_yaml_tab_error_is_one_error() -> None:
    [error] = errors("kind: CiliumNetworkPolicy\nspec:\n\t- a\n")
    assert error.path == "line 3, column 1"


def test_non_object_documents() -> None:
    found = errors("just a string\n---\n42\n")
    assert [(e.document, e.path) for e in found] == [("p.yaml#1", "<document>"), ("p.yaml#2", "<document>")]


def test_missing_and_unsupported_kind() -> None:
    found = errors("metadata: {name: a}\n---\nkind: ClusterNetworkPolicy\nmetadata: {name: b}\n")
    assert [(e.path, e.reason.split(" ")[0]) for e in found] == [("kind", "required"),
                                                                 ("kind", "ClusterNetworkPolicy")]


def test_timestamps_stay_strings() -> None:
    text = GOOD.replace("metadata: {name: rule1, namespace: default}",
                        "metadata: {name: rule1, namespace: default, creationTimestamp: 2020-01-01}")
    [policy] = load_policies(text)
    meta = policy.source["metadata"]
    assert isinstance(meta, dict) and meta["creationTimestamp"] == "2020-01-01"
    json.dumps(policy.source)


def test_warnings_are_collected() -> None:
    warnings: list[FieldError] = []
    load_policies(GOOD + "---\n" + GOOD, "w.yaml", warnings=warnings)
    assert [w.reason for w in warnings] == [
        "CiliumNetworkPolicy default/rule1 is given more than once; the last one wins"]


def test_files_are_all_or_nothing(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(BAD)
    assert len(load_policy_files([good, str(good)])) == 2
    with pytest.raises(PolicyValidationError) as info:
        load_policy_files([good, bad, tmp_path / "missing.yaml"])
    assert [e.document for e in info.value.errors] == [
        f"{bad}#1 (CiliumNetworkPolicy prod/bad1)", str(tmp_path / "missing.yaml")]


def test_files_with_bom_and_bad_encoding(tmp_path: Path) -> None:
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert len(load_policy_files([bom])) == 1
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"kind: \xff\n")
    with pytest.raises(PolicyValidationError) as info:
        load_policy_files([latin])
    assert info.value.errors[0].reason.startswith("not UTF-8")


def test_envelope_keys_match_case_insensitively() -> None:
    text = GOOD.replace("apiVersion:", "APIVersion:").replace("kind:", "Kind:").replace("spec:", "Spec:")
    [policy] = load_policies(text)
    assert policy.kind == "CiliumNetworkPolicy" and len(policy.rules) == 1


def test_alias_bombs_are_rejected_quickly() -> None:
    levels = ["a: &a [x,x,x,x,x,x,x,x,x,x]"]
    for prev, cur in zip("abcdef", "bcdefg", strict=True):
        levels.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 10) + "]")
    [error] = errors("\n".join(levels) + "\nkind: CiliumNetworkPolicy\n")
    assert error.reason.startswith("too large")


def test_deep_nesting_is_an_error() -> None:
    [error] = errors("[" * 5000 + "]" * 5000)
    assert "nested too deeply" in error.reason


def test_non_json_yaml_values_are_errors() -> None:
    found = errors("kind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec: {endpointSelector: {}}\n"
                   "x: !!set {a, b}\n")
    assert [(e.path, e.reason) for e in found] == [("x", "unsupported value of type set")]


def test_parse_policy_rejects_non_objects_and_lists() -> None:
    from flagella.policy.api import parse_policy

    for obj in (["x"], "text", {"kind": "List", "items": []}):
        with pytest.raises(PolicyValidationError):
            parse_policy(obj)  # type: ignore[arg-type]


def test_parse_policy_document_label() -> None:
    from flagella.policy.api import parse_policy

    doc = {"kind": "NetworkPolicy", "metadata": {"name": "n"}, "spec": {"podSelector": {}, "x": 1}}
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(doc)
    assert [str(e) for e in info.value.errors] == ["NetworkPolicy default/n: spec.x: unknown field"]
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(doc, "f.yaml#3")
    assert info.value.errors[0].document == "f.yaml#3 (NetworkPolicy default/n)"
