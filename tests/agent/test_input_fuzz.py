"""Fuzzed settings files and API requests never crash: they fail with an InputError."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagella import rpc
from flagella.agent.core import AgentCore
from flagella.agent.server import AgentServer
from flagella.agent.settings import AgentSettings, load_settings
from flagella.datapath.port import MemoryDatapath
from flagella.errors import FlagellaError, InputError

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=10), c, max_size=3)), max_leaves=10)
KEYS = ["state_dir", "network", "policy", "conntrack", "controllers", "metrics_addr", "label_prefixes",
        "ipv4_cidr", "mtu", "enforcement", "tcp_syn_s", "sync_interval_s", "bogus"]
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
           "policy.import", "policy.delete", "policy.trace", "identity.get", "bpf.policy", "policy.wait"]


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
