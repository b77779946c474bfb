"""The agent's API under abuse (issue 11, items 4 and 6), against a real agent over its socket.

Each test is the attack itself, through the CLI or a raw unix socket:

* a backtracking-bomb HTTP path regex (``/(a+)+$``) traced with a long path answers at
  once, with RE2's verdict; patterns RE2 rejects are refused naming the field;
* a heavy trace does not hold the agent: ``status`` answers while it runs, and the
  trace ends with a time-limit error;
* a request over ``api.max_request_bytes`` gets an error answer, not "Broken pipe";
* connections beyond ``api.max_connections`` are answered "agent busy" at once, idle
  ones are closed after ``api.idle_timeout_s``, and a legitimate client is then served;
* deep nesting and out-of-range numbers are input errors, not "internal error".

The agent runs with lowered limits (`LIMITS`) so that the tests stay small. The only
sleeps are ordering aids; every wait is bounded by a generous failure guard.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flagella.errors import InputError
from tests.system._support import Agent

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

MAX_REQUEST = 1 << 20
IDLE_S = 8
MAX_CONNECTIONS = 100
TRACE_TIMEOUT_S = 10
LIMITS = (
    f"api: {{max_request_bytes: {MAX_REQUEST}, idle_timeout_s: {IDLE_S}, "
    f"max_connections: {MAX_CONNECTIONS}, trace_timeout_s: {TRACE_TIMEOUT_S}}}\n"
)


@pytest.fixture(scope="module")
def agent(system_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("agent-api"), "api", 1.0)
    with open(a.config, "a") as f:
        f.write(LIMITS)
    try:
        a.start()
        yield a
    finally:
        a.close()


def cnp(name: str, app: str, http: list[dict[str, str]], peer: str = "client") -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": app}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"app": peer}}],
                "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": http}}],
            }],
        },
    }


def write_policies(path: Path, docs: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    return str(path)


def raw_request(agent: Agent, line: bytes, timeout: float = 30.0) -> dict[str, Any]:
    """Send one raw request line; return the decoded answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(agent.socket)
        s.sendall(line)
        with s.makefile("rb") as f:
            answer = f.readline()
    assert answer.endswith(b"\n"), f"no answer line: {answer[:200]!r}"
    decoded: dict[str, Any] = json.loads(answer)
    return decoded


def policy_names(agent: Agent) -> set[str]:
    return {p["metadata"]["name"] for p in agent.call("policy.get")["policies"]}


# -- item 4: RE2 ------------------------------------------------------------------------------


def test_backtracking_bomb_traces_at_once_with_re2_verdicts(agent: Agent, tmp_path: Path) -> None:
    path = write_policies(tmp_path / "redos.json", [cnp("redos", "redos-web", [{"path": "/(a+)+$"}])])
    agent.cli("policy", "import", path)
    base = ["policy", "trace", "-s", "app=client", "-d", "app=redos-web", "--dport", "80/TCP", "-o", "json"]
    # 2**40 backtracking steps in Python's re: the failure guard is the CLI timeout.
    bomb = json.loads(agent.cli(*base, "--http-path", "/" + "a" * 40 + "!", timeout=120).stdout)
    assert (bomb["verdict"], bomb["l7"]) == ("denied", "rejected")
    fine = json.loads(agent.cli(*base, "--http-path", "/" + "a" * 40).stdout)
    assert (fine["verdict"], fine["l7"]) == ("allowed", "forwarded")
    # Full match: a prefix match is not enough.
    tail = json.loads(agent.cli(*base, "--http-path", "/aaa/more").stdout)
    assert tail["l7"] == "rejected"


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [(r"/(a)\1", "invalid escape sequence"), ("/(?=x)x", "invalid perl operator: (?="),
     ("/x(?<=x)", "invalid perl operator: (?<")],
)
def test_non_re2_patterns_are_refused_naming_the_field(agent: Agent, tmp_path: Path, pattern: str, reason: str) -> None:
    doc = cnp("not-re2", "re2-web", [{"method": "GET"}, {"path": pattern}])
    field = "spec.ingress[0].toPorts[0].rules.http[1].path"
    # The CLI validates before it sends ...
    r = agent.cli("policy", "import", write_policies(tmp_path / "bad.json", [doc]), check=False)
    assert r.returncode == 2, r.stderr
    assert f"{field}: not a valid RE2 regex: {reason}" in r.stderr
    # ... and the agent validates what reaches its socket, whoever sent it.
    with pytest.raises(InputError) as refused:
        agent.call("policy.import", {"documents": [doc]})
    assert f"{field}: not a valid RE2 regex: {reason}" in str(refused.value)
    assert "not-re2" not in policy_names(agent)


def test_status_answers_while_a_heavy_trace_runs_and_the_trace_times_out(agent: Agent, tmp_path: Path) -> None:
    # 2,000 rules and queries whose destinations differ: each query resolves a new endpoint.
    docs = [cnp(f"heavy-{i}", "heavy-web", [{"path": "/(a+)+$"}], peer=f"c{i}") for i in range(2000)]
    agent.cli("policy", "import", write_policies(tmp_path / "heavy.json", docs), timeout=120)
    queries = [
        {"src": {"labels": [f"app=c{i}"]}, "dst": {"labels": ["app=heavy-web", f"n={i}"]}, "dport": "80/TCP",
         "http": {"path": "/" + "a" * 40 + "!"}}
        for i in range(1000)
    ]
    outcome: dict[str, Any] = {}

    def trace() -> None:
        try:
            outcome["result"] = agent.call("policy.trace", {"queries": queries}, timeout=120)
        except Exception as exc:
            outcome["error"] = exc

    tracer = threading.Thread(target=trace)
    tracer.start()
    try:
        time.sleep(1.0)  # ordering aid: the trace reaches the agent first
        assert tracer.is_alive(), f"the trace ended early: {outcome}"
        status = json.loads(agent.cli("status", "-o", "json").stdout)
        trace_still_running = tracer.is_alive()
    finally:
        tracer.join(timeout=120)
    assert status["policies"] >= 2000
    assert trace_still_running, "status waited for the trace"
    assert "result" not in outcome
    assert isinstance(outcome["error"], InputError)
    assert f"not finished within {TRACE_TIMEOUT_S}s (api.trace_timeout_s)" in str(outcome["error"])
    agent.call("policy.delete", {"names": [d["metadata"]["name"] for d in docs], "namespace": "default"})


# -- item 6: the API under abuse ------------------------------------------------------------------


def test_request_over_the_size_limit_gets_an_error_answer(agent: Agent, tmp_path: Path) -> None:
    docs = [cnp(f"big-{i}", f"big-{i}", [{"path": "/" + "x" * 200}]) for i in range(4000)]
    path = write_policies(tmp_path / "big.json", docs)
    assert Path(path).stat().st_size > MAX_REQUEST
    r = agent.cli("policy", "import", path, check=False, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"request: larger than {MAX_REQUEST} bytes (api.max_request_bytes)" in r.stderr
    assert "Broken pipe" not in r.stderr
    assert not any(name.startswith("big-") for name in policy_names(agent))
    # The same through a raw socket that keeps sending after the agent stopped reading.
    with pytest.raises(InputError, match="api.max_request_bytes"):
        agent.call("policy.import", {"documents": [], "padding": "x" * (8 * MAX_REQUEST)})
    assert agent.call("status")["policies"] >= 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"method":"policy.import","params":{"documents":' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n",
         "nested deeper than 64 levels"),
        (b'{"method":"policy.wait","params":{"revision":' + b"9" * 5000 + b"}}\n", "out of range"),
        (b'{"method":"policy.wait","params":{"revision":1e999}}\n', "out of range"),
        (b'{"method":"policy.wait","params":{"revision":-Infinity}}\n', "-Infinity is not a JSON number"),
        (b'{"method":"endpoint.get","params":{"name":"\\ud800"}}\n', "lone surrogate"),
    ],
)
def test_hostile_json_is_an_input_error(agent: Agent, line: bytes, message: str) -> None:
    answer = raw_request(agent, line)
    assert answer["ok"] is False
    assert answer["kind"] == "input", answer
    assert message in answer["error"]
    assert "internal error" not in answer["error"]


def test_connection_flood_is_capped_and_idle_connections_time_out(agent: Agent) -> None:
    flood = 3 * MAX_CONNECTIONS
    socks = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(flood):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(agent.socket)  # blocking: waits while the listen backlog is full
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)
        # Every slot is held by an idle connection: a legitimate client is told so, promptly.
        r = agent.cli("status", check=False)
        assert r.returncode != 0
        assert f"agent busy: {MAX_CONNECTIONS} connections open (api.max_connections)" in r.stderr
        # Each connection gets one error line and EOF: "busy" beyond the cap, then idle timeouts.
        answers: dict[socket.socket, bytes] = {}
        deadline = time.monotonic() + 4 * IDLE_S + 60  # failure guard
        while len(answers) < flood and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                data = s.recv(65536)
                answers[s] = answers.get(s, b"") + data
                if not data or data.endswith(b"\n"):
                    sel.unregister(s)
        assert all(answers.values()), "a connection was closed without an answer"
        errors = [json.loads(a) for a in answers.values()]
        busy = [e for e in errors if "api.max_connections" in e["error"]]
        idle = [e for e in errors if "api.idle_timeout_s" in e["error"]]
        assert len(answers) == flood, f"{flood - len(answers)} connections never answered"
        assert (len(busy), len(idle)) == (flood - MAX_CONNECTIONS, MAX_CONNECTIONS)
        assert all(e["ok"] is False for e in errors)
    finally:
        sel.close()
        for s in socks:
            s.close()
    # The idle ones are gone: the legitimate client is served again.
    assert json.loads(agent.cli("status", "-o", "json").stdout)["policies"] >= 0
