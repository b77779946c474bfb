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
        load_settings(path)
    except InputError as exc:
        assert str(exc)


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
        server.handlers[method](params)
    except FlagellaError as exc:
        assert str(exc)
    # answers always encode
    rpc.encode({"ok": True})


@given(st.binary(max_size=64))
def test_garbage_lines_are_input_errors(line):
    try:
        decoded = rpc.decode(line)
    except InputError as exc:
        assert "request" in str(exc)
    else:
        assert json.dumps(decoded) is not None
