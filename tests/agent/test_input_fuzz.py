"""Fuzzed settings files, API requests and request framing never crash: they fail with an InputError."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagella import rpc
from flagella.agent.core import AgentCore
from flagella.agent.server import AgentServer
from flagella.agent.settings import AgentSettings, ApiSettings, load_settings
from flagella.datapath.port import MemoryDatapath
from flagella.errors import FlagellaError, InputError

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=10), c, max_size=3)), max_leaves=10)
KEYS = ["state_dir", "network", "policy", "conntrack", "controllers", "metrics_addr", "label_prefixes",
        "ipv4_cidr", "mtu", "enforcement", "tcp_syn_s", "sync_interval_s", "bogus",
        "api", "max_request_bytes", "idle_timeout_s", "max_connections", "trace_timeout_s"]
documents = st.dictionaries(st.sampled_from(KEYS), st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=3)), max_size=4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents)
def test_settings_files_fail_cleanly(tmp_path, doc):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(doc))
    try:
        loaded = load_settings(path)
    except InputError as exc:
        assert str(exc), f"an error without a message for {doc!r}"
    else:
        assert isinstance(loaded, AgentSettings)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    core = AgentCore(AgentSettings(state_dir=str(tmp_path_factory.mktemp("fuzz"))), MemoryDatapath())
    core.restore()
    core.create_endpoint("a", labels={"app": "a"})
    return AgentServer(core)


METHODS = ["endpoint.create", "endpoint.get", "endpoint.delete", "endpoint.labels", "namespace.labels",
           "policy.import", "policy.delete", "policy.trace", "identity.get", "bpf.policy"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(METHODS), st.dictionaries(st.sampled_from(
    ["name", "namespace", "labels", "set", "unset", "documents", "queries", "id", "ipv4", "names", "revision", "all"]
), values, max_size=4))
def test_api_requests_fail_cleanly(server, method, params):
    if method in ("endpoint.delete",) and params.get("name") in ("a", "default/a", 1, "1"):
        return
    try:
        answer = server.handlers[method](params)
    except FlagellaError as exc:
        assert str(exc), f"{method}: an error without a message"
        wire = rpc.decode(rpc.error(exc))
        assert wire["ok"] is False and wire["error"] == str(exc)
        return
    # The handler's own answer goes on the wire: it encodes and comes back unchanged.
    wire = rpc.decode(rpc.ok(answer))
    assert wire == {"ok": True, "result": json.loads(json.dumps(answer))}


@given(st.binary(max_size=64))
def test_garbage_lines_are_input_errors(line):
    try:
        decoded = rpc.decode(line)
    except InputError as exc:
        assert "request" in str(exc)
    else:
        # What decodes is exactly the JSON of the line.
        assert decoded == json.loads(line)



# -- the request framing, over a real socket ------------------------------------------------------
#
# The API of an in-memory agent (the datapath twin), served by the real asyncio server on a
# temporary unix socket. Every expectation is computed from the input the test generated.

LIMIT = 4096


@pytest.fixture(scope="module")
def api_socket(tmp_path_factory):
    state = tmp_path_factory.mktemp("api")
    settings = AgentSettings(state_dir=str(state), api=ApiSettings(max_request_bytes=LIMIT, idle_timeout_s=30.0))
    core = AgentCore(settings, MemoryDatapath())
    core.restore()
    core.create_endpoint("a", labels={"app": "a"})
    server = AgentServer(core)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    path = str(state / "api.sock")
    listener = asyncio.run_coroutine_threadsafe(server.start_api(path), loop).result(timeout=30)
    yield path
    loop.call_soon_threadsafe(listener.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    server.trace_worker.shutdown(wait=False)


def exchange(path: str, chunks: list[bytes]) -> list[bytes]:
    """Send ``chunks`` on one connection; return every line the agent sent before EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)  # failure guard
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for chunk in chunks:
                s.sendall(chunk)
        with s.makefile("rb") as f:
            return f.readlines()


def depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def check_answer(lines: list[bytes]) -> dict:
    assert len(lines) == 1 and lines[0].endswith(b"\n"), lines
    answer = json.loads(lines[0])
    assert isinstance(answer, dict) and isinstance(answer["ok"], bool)
    if not answer["ok"]:
        assert answer["kind"] in ("input", "agent") and answer["error"]
        assert "internal error" not in answer["error"]
    return answer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["status", "endpoint.get", "policy.wait", "identity.get", "policy.trace", "nosuch"]),
    nesting=st.integers(0, 90),
    number=st.one_of(st.integers(-(2**66), 2**66), st.integers(-(10**30), 10**30)),
    pad=st.integers(0, LIMIT + 200),
    cuts=st.lists(st.integers(0, 10**6), max_size=6),
    trailer=st.binary(max_size=20),
)
def test_framing_limits_answer_from_the_input(api_socket, method, nesting, number, pad, cuts, trailer):
    value: object = number
    for _ in range(nesting):
        value = [value]
    request = {"method": method, "params": {"name": value, "pad": "x" * pad}}
    line = json.dumps(request).encode()
    answer = check_answer(exchange(api_socket, split(line + b"\n" + trailer, cuts)))
    applicable = []
    if len(line) > LIMIT:
        applicable.append(f"request: larger than {LIMIT} bytes (api.max_request_bytes)")
    else:
        if not rpc.INT_RANGE[0] <= number <= rpc.INT_RANGE[1]:
            applicable.append("is out of range (64 bits at most)")
        if depth(request) > rpc.MAX_DEPTH:
            applicable.append(f"nested deeper than {rpc.MAX_DEPTH} levels")
    framing = ("api.max_request_bytes", "out of range", "nested deeper")
    if applicable:
        assert answer["ok"] is False and answer["kind"] == "input"
        assert any(reason in answer["error"] for reason in applicable), (answer, applicable)
    else:
        assert answer["ok"] or not any(word in answer["error"] for word in framing), answer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.lists(st.integers(0, 10**6), max_size=4))
def test_garbage_gets_one_input_error_line(api_socket, data, cuts):
    first = data.split(b"\n")[0]
    try:
        parsed = json.loads(first)
    except ValueError:
        parsed = None
    answer = check_answer(exchange(api_socket, split(data + b"\n", cuts)))
    if not (isinstance(parsed, dict) and isinstance(parsed.get("method"), str)):
        assert answer["ok"] is False and answer["kind"] == "input"
        assert answer["error"].startswith("request")
