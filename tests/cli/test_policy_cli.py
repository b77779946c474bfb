"""`flagella policy validate|trace`, offline: output formats and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flagella.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "starwars"
L3L4 = str(EXAMPLES / "sw_l3_l4_policy.yaml")
L7 = str(EXAMPLES / "sw_l3_l4_l7_policy.yaml")
TIEFIGHTER = "k8s:org=empire,k8s:class=tiefighter"
XWING = "k8s:org=alliance,k8s:class=xwing"
DEATHSTAR = "k8s:org=empire,k8s:class=deathstar"

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def trace_json(*args: str) -> dict:
    r = run("policy", "trace", "--output", "json", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_validate_ok_and_bad(tmp_path):
    r = run("policy", "validate", L3L4, L7)
    assert r.exit_code == 0 and "valid" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(L3L4).read_text().replace('"80"', '"80000"'))
    r = run("policy", "validate", str(bad))
    assert r.exit_code == 2
    assert "toPorts[0].ports[0].port" in r.output


def test_trace_l3_l4_verdicts_and_json_shape():
    out = trace_json("--policy", L3L4, "-s", TIEFIGHTER, "-d", DEATHSTAR, "--dport", "80/TCP")
    assert out["verdict"] == "allowed"
    assert out["ingress"]["verdict"] == "allowed" and out["ingress"]["enforced"] is True
    assert out["egress"]["verdict"] == "allowed" and out["egress"]["enforced"] is False
    assert "default/rule1" in out["rules"]
    out = trace_json("--policy", L3L4, "-s", XWING, "-d", DEATHSTAR, "--dport", "80/TCP")
    assert out["verdict"] == "denied" and out["ingress"]["verdict"] == "denied"
    out = trace_json("--policy", L3L4, "-s", TIEFIGHTER, "-d", DEATHSTAR, "--dport", "443/TCP")
    assert out["verdict"] == "denied"


def test_trace_l7_forwarded_or_rejected():
    common = ("--policy", L7, "-s", TIEFIGHTER, "-d", DEATHSTAR, "--dport", "80/TCP")
    out = trace_json(*common, "--http-method", "POST", "--http-path", "/v1/request-landing")
    assert out["verdict"] == "allowed" and out["l7"] == "forwarded"
    out = trace_json(*common, "--http-method", "PUT", "--http-path", "/v1/exhaust-port")
    assert out["verdict"] == "denied" and out["l7"] == "rejected"


def test_trace_text_reads_like_cilium():
    r = run("policy", "trace", "--policy", L3L4, "-s", XWING, "-d", DEATHSTAR, "--dport", "80/TCP")
    assert r.exit_code == 0
    assert "Tracing From:" in r.stdout and r.stdout.strip().endswith("Final verdict: DENIED")


def test_trace_world_by_ip_and_named_ports(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: 203.0.113.0/24}}]
    ports: [{port: http, protocol: TCP}]
"""
    )
    base = ("--policy", str(policy), "--dst-labels", "app=web", "--dst-named-port", "http=8080/TCP")
    assert trace_json(*base, "--src-ip", "203.0.113.5", "--dport", "8080/TCP")["verdict"] == "allowed"
    assert trace_json(*base, "--src-ip", "203.0.113.5", "--dport", "80/TCP")["verdict"] == "denied"
    assert trace_json(*base, "--src-ip", "198.51.100.5", "--dport", "8080/TCP")["verdict"] == "denied"


def test_queries_answer_one_line_per_query_in_order(tmp_path):
    queries = tmp_path / "q.jsonl"
    lines = [
        {"src": {"labels": TIEFIGHTER}, "dst": {"labels": DEATHSTAR}, "dport": "80/TCP"},
        {"src": {"labels": XWING.split(",")}, "dst": {"labels": DEATHSTAR}, "dport": "80/TCP"},
        {"src": {"labels": TIEFIGHTER}, "dst": {"labels": DEATHSTAR}, "dport": "80/TCP",
         "http": {"method": "PUT", "path": "/v1/exhaust-port"}},
        {"src": {"ip": "10.244.9.9"}, "dst": {"labels": DEATHSTAR}, "dport": "80/TCP"},
    ]
    queries.write_text("\n".join(json.dumps(q) for q in lines) + "\n")
    r = run("policy", "trace", "--policy", L7, "--queries", str(queries))
    assert r.exit_code == 0, r.output
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["verdict"] for a in answers] == ["allowed", "denied", "denied", "denied"]
    assert answers[2]["l7"] == "rejected"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-s", TIEFIGHTER, "-d", DEATHSTAR, "--dport", "80/XTP"), "--dport"),
        (("-s", TIEFIGHTER, "-d", DEATHSTAR, "--dport", "99999/TCP"), "--dport"),
        (("-s", TIEFIGHTER, "--dst-ip", "not-an-ip"), "--dst-ip"),
        (("-d", DEATHSTAR), "--src-labels or --src-ip"),
        (("-s", TIEFIGHTER, "-d", DEATHSTAR, "--kafka-api-key", "nosuchkey"), "api_key"),
        (("-s", TIEFIGHTER, "-d", DEATHSTAR, "--http-header", "nocolon"), "--http-header: 'nocolon'"),
    ],
)
def test_bad_input_exits_2_and_names_the_flag(args, message):
    r = run("policy", "trace", "--policy", L3L4, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_bad_query_line_names_the_line(tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"src": {"labels": "a=b"}, "dst": {"labels": "c=d"}}\n{"src": 5}\n')
    r = run("policy", "trace", "--policy", L3L4, "--queries", str(queries))
    assert r.exit_code == 2 and "line 2" in r.output


def test_missing_policy_file_is_bad_input(tmp_path):
    r = run("policy", "trace", "--policy", str(tmp_path / "nope.yaml"), "-s", "a=b", "-d", "c=d")
    assert r.exit_code == 2


REDOS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: redos, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{path: "%s"}]}
"""


def test_offline_trace_of_a_backtracking_bomb_uses_re2(tmp_path):
    policy = tmp_path / "redos.yaml"
    policy.write_text(REDOS % "/(a+)+$")
    base = ("--policy", str(policy), "-s", "app=client", "-d", "app=web", "--dport", "80/TCP")
    # Python's re needs 2**40 steps for this path; RE2 is linear.
    assert trace_json(*base, "--http-path", "/" + "a" * 40 + "!")["l7"] == "rejected"
    assert trace_json(*base, "--http-path", "/" + "a" * 40)["l7"] == "forwarded"


@pytest.mark.parametrize("pattern", [r"/(a)\\1", "/(?=admin).*", "/(?<!x)y"])
def test_validate_refuses_what_re2_refuses(tmp_path, pattern):
    policy = tmp_path / "bad.yaml"
    policy.write_text(REDOS % pattern)
    r = run("policy", "validate", str(policy))
    assert r.exit_code == 2
    assert "spec.ingress[0].toPorts[0].rules.http[0].path: not a valid RE2 regex" in r.output
