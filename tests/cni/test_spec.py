"""The CNI protocol core (`flagella.cni._spec`) and the plugin executable's error path.

Bad configurations and environments must give the spec's error object (``code``, ``msg``,
``details``) on stdout and a non-zero exit, with the offending field named; hypothesis
throws arbitrary bytes and arbitrary JSON at the configuration parser.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flagella.cni import CniError, parse_config, parse_invocation, run
from flagella.cni._spec import SUPPORTED_VERSIONS, add_result, check_prev_result

GOOD: dict[str, Any] = {"cniVersion": "1.0.0", "name": "flagella", "type": "flagella-cni"}
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc123",
    "CNI_NETNS": "/var/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod",
    "CNI_PATH": "/opt/cni/bin",
}


def conf(**changes: Any) -> bytes:
    out = {**GOOD, **changes}
    return json.dumps({k: v for k, v in out.items() if v is not ...}).encode()


# Each malformed configuration, the error code and the field the message must name.
BAD_CONFIGS = [
    (b"{not json", 6, "decode"),
    (b"[1, 2]", 7, "top level"),
    (conf(cniVersion=...), 7, "cniVersion"),
    (conf(cniVersion=100), 7, "cniVersion"),
    (conf(cniVersion="one"), 7, "cniVersion"),
    (conf(cniVersion="0.1.0"), 1, "cniVersion"),
    (conf(name=...), 7, "name"),
    (conf(name="-bad name"), 7, "name"),
    (conf(type=...), 7, "type"),
    (conf(type="../../bin/sh"), 7, "type"),
    (conf(mtu="1500"), 7, "mtu"),
    (conf(mtu=100), 7, "mtu"),
    (conf(mtu=True), 7, "mtu"),
    (conf(socket="relative.sock"), 7, "socket"),
    (conf(agentTimeoutSeconds=-1), 7, "agentTimeoutSeconds"),
    (conf(prevResult=[]), 7, "prevResult"),
    (conf(**{"cni.dev/valid-attachments": [{"ifname": "eth0"}]}), 7, "cni.dev/valid-attachments[0].containerID"),
]


@pytest.mark.parametrize(("raw", "code", "field"), BAD_CONFIGS)
def test_bad_configuration_names_the_field(raw: bytes, code: int, field: str) -> None:
    with pytest.raises(CniError) as err:
        parse_config(raw)
    assert err.value.code == code
    assert field in err.value.msg + err.value.details


BAD_ENVS = [
    ({"CNI_COMMAND": "BOOT"}, "CNI_COMMAND"),
    ({"CNI_COMMAND": ""}, "CNI_COMMAND"),
    ({"CNI_CONTAINERID": ""}, "CNI_CONTAINERID"),
    ({"CNI_CONTAINERID": "-x;rm"}, "CNI_CONTAINERID"),
    ({"CNI_NETNS": ""}, "CNI_NETNS"),
    ({"CNI_NETNS": "netns/x"}, "CNI_NETNS"),
    ({"CNI_IFNAME": ""}, "CNI_IFNAME"),
    ({"CNI_IFNAME": "a-very-long-interface-name"}, "CNI_IFNAME"),
    ({"CNI_IFNAME": "../eth0"}, "CNI_IFNAME"),
    ({"CNI_ARGS": "K8S_POD_NAME"}, "CNI_ARGS"),
    ({"CNI_ARGS": "K8S_POD_NAME=a"}, "CNI_ARGS"),
]


@pytest.mark.parametrize(("change", "variable"), BAD_ENVS)
def test_bad_environment_names_the_variable(change: dict[str, str], variable: str) -> None:
    with pytest.raises(CniError) as err:
        parse_invocation({**ENV, **change}, conf())
    assert err.value.code == 4
    assert variable in err.value.msg + err.value.details


def test_del_needs_no_netns_and_version_needs_no_config() -> None:
    inv = parse_invocation({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, conf())
    assert (inv.command, inv.netns, inv.pod) == ("DEL", "", ("ns", "pod"))
    code, out = run({"CNI_COMMAND": "VERSION"}, b"")
    assert code == 0
    assert json.loads(out) == {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    # libcni's probe sends only the version it speaks.
    code, out = run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.1.0"}')
    assert (code, json.loads(out)["cniVersion"]) == (0, "1.1.0")


def test_result_shape() -> None:
    inv = parse_invocation(ENV, conf(cniVersion="1.1.0"))
    answer = {
        "endpoint": {"ifname": "eth0", "mac": "02:00:00:00:00:01", "ipv4": "10.244.0.7", "ipv6": "fd00:10:244::7", "mtu": 1400},
        "gateways": {"ipv4": "169.254.1.1", "ipv6": "fe80::1"},
    }
    result = add_result(inv, answer)
    assert result == {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/x", "mtu": 1400}],
        "ips": [
            {"address": "10.244.0.7/32", "gateway": "169.254.1.1", "interface": 0},
            {"address": "fd00:10:244::7/128", "gateway": "fe80::1", "interface": 0},
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}],
        "dns": {},
    }
    # CHECK: the same result as prevResult passes, another address does not.
    check_prev_result(parse_invocation({**ENV, "CNI_COMMAND": "CHECK"}, conf(prevResult=result)), answer)
    moved = {**result, "ips": [{"address": "10.244.0.8/32", "interface": 0}]}
    with pytest.raises(CniError, match="ips"):
        check_prev_result(parse_invocation({**ENV, "CNI_COMMAND": "CHECK"}, conf(prevResult=moved)), answer)


def test_unreachable_agent_is_try_again_later(tmp_path: Any) -> None:
    code, out = run(ENV, conf(socket=str(tmp_path / "nobody.sock")))
    assert code == 1
    err = json.loads(out)
    assert err["code"] == 11 and "not reachable" in err["msg"], err


def test_executable_prints_the_error_object() -> None:
    """The real entry point: error JSON on stdout, exit status 1, nothing on the way to an agent."""
    env = {**ENV, "PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for raw, code, field in BAD_CONFIGS[:8]:
        p = subprocess.run(
            [sys.executable, "-m", "flagella.cni"], input=raw, env=env, capture_output=True, timeout=60
        )
        assert p.returncode == 1, (raw, p.stderr)
        err = json.loads(p.stdout)
        assert err["code"] == code and field in err["msg"] + err.get("details", ""), err
        assert set(err) <= {"cniVersion", "code", "msg", "details"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
fields = st.sampled_from(
    ["cniVersion", "name", "type", "mtu", "socket", "prevResult", "agentTimeoutSeconds", "cni.dev/valid-attachments", "other"]
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_bytes(raw: bytes) -> None:
    try:
        parse_config(raw)
    except CniError as exc:
        assert exc.code in (1, 6, 7)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(fields, json_values, max_size=6), st.booleans())
def test_fuzz_config_fields(changes: dict[str, Any], start_good: bool) -> None:
    """Any JSON object: a NetConf whose fields are what the document said, or an error
    with a spec code that names a field of the document."""
    doc = {**GOOD, **changes} if start_good else changes
    try:
        got = parse_config(json.dumps(doc).encode())
    except CniError as exc:
        assert exc.code in (1, 7)
        named = exc.msg + exc.details
        assert any(key in named for key in [*doc, *GOOD, "top level"]), named
        return
    assert got.cni_version in SUPPORTED_VERSIONS
    assert (got.name, got.type) == (doc["name"], doc["type"])
    assert got.mtu == doc.get("mtu")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(ENV)), st.text(max_size=30), max_size=6))
def test_fuzz_environment(changes: dict[str, str]) -> None:
    """Environment variables: an invocation or a code-4 error (or a config error), never a crash."""
    # No agent listens on the socket: a run that gets that far fails with 11, try again later.
    stdin = conf(socket="/nonexistent/flagella-cni-fuzz.sock")
    code, out = run({**ENV, **changes, "CNI_COMMAND": changes.get("CNI_COMMAND", "VERSION")}, stdin)
    obj = json.loads(out)
    if code:
        assert obj["code"] in (4, 7, 11) and obj["msg"]
    else:
        assert obj["supportedVersions"] == list(SUPPORTED_VERSIONS)
